"""The driver (compressor/calibration/driver.py), end to end on tiny models of every supported
architecture: compress, export, reload both ways; sequential calibration; the dense stream."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import compressor
from compressor import models
from compressor import ranks as ranks_mod
from compressor.api import compress
from compressor.calibration import driver
from compressor.calibration.collect import GramCollector
from compressor.calibration.windows import calibration_windows
from compressor.environment import device_name
from compressor.modules import LowRankLinear


def _truncation_error_fp64(w: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(w.double())
    return float(s[rank:].square().sum().sqrt())


@pytest.mark.parametrize("recipe", ["svd", "welore"])
def test_compress_export_reload(arch, recipe, tokenizer, tmp_path):
    model = tiny_model(arch)
    dense = {n: models.weight_of(m).detach().clone() for n, _, m in models.iter_linears(model)}
    out = tmp_path / "out"
    result = compress(model, recipe, out, tokenizer=tokenizer, ratio=0.3, device="cpu")
    report = json.loads((out / "compression_report.json").read_text())

    factorised = {n: r for n, r in report["per_module"].items() if r != "dense"}
    assert factorised, "nothing was factorised"
    # The ratio is over weight matrices (biases are kept either way).
    shapes = {n: tuple(w.shape) for n, w in dense.items()}
    ranks = {n: None if r == "dense" else r for n, r in report["per_module"].items()}
    assert ranks_mod.params_after(shapes, ranks) <= 0.7 * sum(o * i for o, i in shapes.values())
    for name, rank in factorised.items():
        module = result.model.get_submodule(name)
        assert isinstance(module, LowRankLinear) and module.rank == rank
        approx = (module.up.weight @ module.down.weight).detach().double()
        err = float((dense[name].double() - approx).norm())
        ref = _truncation_error_fp64(dense[name], rank)
        assert err == pytest.approx(ref, rel=1e-4, abs=1e-6), name

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = result.model(ids).logits
        ours = compressor.load(out)
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert (ours(ids).logits - expected).abs().max() <= 1e-4
        assert (remote(ids).logits - expected).abs().max() <= 1e-4
    assert models.count_params(ours) == report["params_after"]
    assert models.count_params(remote) == report["params_after"]
    assert report["params_after"] < report["params_before"]


def test_safetensors_shrink_with_parameters(tokenizer, tmp_path):
    dense_dir, small_dir = tmp_path / "dense", tmp_path / "small"
    tiny_model("llama").save_pretrained(dense_dir)
    report = compress(tiny_model("llama"), "svd", small_dir, tokenizer=tokenizer, ratio=0.4, device="cpu").report
    dense_bytes = sum(f.stat().st_size for f in dense_dir.glob("*.safetensors"))
    small_bytes = sum(f.stat().st_size for f in small_dir.glob("*.safetensors"))
    removed = report["params_before"] - report["params_after"]
    # fp32: 4 bytes a parameter; headers differ by at most a few kB.
    assert dense_bytes - small_bytes == pytest.approx(4 * removed, abs=8192)


def test_gqa_and_mqa_shapes_survive(tokenizer, tmp_path):
    for arch in ("mistral", "gpt_bigcode"):
        model = tiny_model(arch)
        shapes = {n: tuple(models.weight_of(m).shape) for n, _, m in models.iter_linears(model)}
        result = compress(model, "svd", tmp_path / arch, tokenizer=tokenizer, ratio=0.2, device="cpu")
        for name, rank in result.report["per_module"].items():
            module = result.model.get_submodule(name)
            assert (module.out_features, module.in_features) == shapes[name]


@pytest.mark.parametrize("recipe", ["whiten", "whiten-budget", "lord", "lost"])
def test_data_aware_compress_export_reload(arch, recipe, tokenizer, tmp_path):
    out = tmp_path / "out"
    result = compress(tiny_model(arch), recipe, out, tokenizer=tokenizer, ratio=0.3, samples=4, seq_len=32, device="cpu")
    report = result.report
    assert report["calibration"] == {"dataset": "code", "samples": 4, "seq_len": 32}
    assert report["device"] == "cpu" and report["device_name"] == device_name(torch.device("cpu")) != ""
    assert any(r != "dense" for r in report["per_module"].values())
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = result.model(ids).logits
        assert torch.isfinite(expected).all()
        ours = compressor.load(out)
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert (ours(ids).logits - expected).abs().max() <= 1e-4
        assert (remote(ids).logits - expected).abs().max() <= 1e-4
    assert models.count_params(ours) == report["params_after"] == models.count_params(remote)


def test_sequential_calibration_sees_compressed_layers(tokenizer):
    """Layer 1's Gram must come from compressed layer 0's outputs, not the dense model's."""
    from compressor import recipe as recipes

    rec = recipes.load("whiten", ratio=0.5)
    method, cpu = rec.stages[0], torch.device("cpu")
    windows = calibration_windows(rec, tokenizer, None, samples=2, seq_len=16)

    dense = tiny_model("llama")
    acts = driver.capture(dense, windows, 2, cpu)
    layers = models.decoder_layers(dense)
    acts.hidden = driver.run_layer(layers[0], acts, 0)
    collector = GramCollector(models.layer_linears(dense, layers[1]), models.arch_for(dense).linears)
    driver.run_layer(layers[1], acts, 1)
    collector.close()
    dense_gram = collector.grams()["attn_in"]

    seen = {}
    real_walk = driver.walk

    def spy(model_, device, visit, *args, **kwargs):
        def recording(i, layer, grams):
            seen[i] = grams["attn_in"].clone()
            visit(i, layer, grams)

        return real_walk(model_, device, recording, *args, **kwargs)

    model = tiny_model("llama")
    driver.walk = spy
    try:
        driver.run(model, [method], cpu, windows, 2)
    finally:
        driver.walk = real_walk
    assert not torch.allclose(seen[1], dense_gram, rtol=1e-3)


def test_dense_stream_pairs_the_dense_models_inputs_with_the_compressed_ones():
    """walk(dense_stream=True): crosses[group] = X_d^T X / N, X_d a linear's input in the dense
    model and X in the compressed one, token by token; the Grams stay X^T X / N."""

    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    model, dense = tiny_model("llama"), tiny_model("llama")
    seen = {}

    def visit(i, layer, grams, crosses):
        seen[i] = (grams["attn_in"].clone(), crosses["attn_in"].clone())
        with torch.no_grad():  # "compress": halve every linear of the layer
            for m in models.layer_linears(model, layer).values():
                m.weight.mul_(0.5)

    driver.walk(model, torch.device("cpu"), visit, windows, batch_size=2, dense_stream=True)

    def q_input(m):
        kept = []
        hook = models.decoder_layers(m)[1].self_attn.q_proj.register_forward_hook(lambda mod, a, o: kept.append(a[0].reshape(-1, a[0].shape[-1]).double()))
        with torch.no_grad():
            m(input_ids=windows, use_cache=False)
        hook.remove()
        return kept[0]

    # halving only linears leaves layer 1's q_proj input as the walk saw it
    X, Xd = q_input(model), q_input(dense)
    gram0, cross0 = seen[0]
    assert torch.allclose(cross0, gram0, rtol=1e-10)  # layer 0: nothing compressed before it
    gram1, cross1 = seen[1]
    assert torch.allclose(gram1, X.T @ X / X.shape[0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(cross1, Xd.T @ X / X.shape[0], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(cross1, gram1, rtol=1e-2)


def _inputs_of(model, linear: str, windows) -> torch.Tensor:
    """Layer 1's `linear` input over `windows`, float64 (tokens, in)."""
    kept = []
    hook = models.decoder_layers(model)[1].get_submodule(linear).register_forward_hook(lambda mod, a, o: kept.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    hook.remove()
    return kept[0]


def test_true_sequential_visits_each_group_on_what_the_compressed_layer_feeds_it():
    """walk(true_sequential=True): one visit per input group in forward order, each with only its
    linears, its Gram (and the dense stream's cross-Gram) taken after the groups before it were
    "compressed"; o_proj's Gram then differs from the one-pass walk's, which saw dense q/k/v."""

    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    groups = models.arch_for(tiny_model("llama")).linears

    def run(true_sequential):
        model = tiny_model("llama")
        seen = []

        def visit(i, layer, grams, crosses=None, only=None):
            seen.append((i, sorted(grams), None if only is None else sorted(only), grams, crosses))
            linears = models.layer_linears(model, layer)
            with torch.no_grad():  # "compress": halve the visited linears
                for name in only or linears:
                    linears[name].weight.mul_(0.5)

        driver.walk(model, torch.device("cpu"), visit, windows, batch_size=2, dense_stream=True, true_sequential=true_sequential)
        return model, seen

    model, seen = run(True)
    order = ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    assert [(i, g) for i, g, *_ in seen] == [(i, [g]) for i in range(len(models.decoder_layers(model))) for g in order]
    assert all(only == sorted(n for n, g in groups.items() if g == gs[0]) for _, gs, only, _, _ in seen)

    dense = tiny_model("llama")
    X, Xd = _inputs_of(model, "self_attn.o_proj", windows), _inputs_of(dense, "self_attn.o_proj", windows)
    (_, _, _, grams, crosses), = [s for s in seen if s[0] == 1 and s[1] == ["attn_out"]]
    assert torch.allclose(grams["attn_out"], X.T @ X / X.shape[0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(crosses["attn_out"], Xd.T @ X / X.shape[0], rtol=1e-5, atol=1e-7)
    X = _inputs_of(model, "mlp.down_proj", windows)
    (_, _, _, grams, _), = [s for s in seen if s[0] == 1 and s[1] == ["mlp_out"]]
    assert torch.allclose(grams["mlp_out"], X.T @ X / X.shape[0], rtol=1e-5, atol=1e-7)

    _, one_pass = run(False)
    assert [only for _, _, only, _, _ in one_pass] == [None] * len(models.decoder_layers(model))
    assert not torch.allclose(one_pass[1][3]["attn_out"], seen[5][3]["attn_out"], rtol=1e-3)
    assert torch.allclose(one_pass[1][3]["attn_in"], seen[4][3]["attn_in"], rtol=1e-6)  # q/k/v's inputs are the same either way

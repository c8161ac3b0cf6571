"""Structured MLP-width reduction: the refit against float64 least squares, the error curve, the
full-width identity, and exports that plain transformers (uniform widths) or the shim (per-layer
widths) load with our logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import compressor
from compressor import models, recipe
from compressor.api import compress
from compressor.errors import CompressorError
from compressor.methods.structured import (
    allocate_widths,
    channel_order,
    channel_scores,
    elimination_order,
    error_curve,
    keep_set,
    refit_down,
    refit_with_error,
    uniform_width,
)

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
CALIB = dict(samples=4, seq_len=32, device="cpu")


def structured(ratio=0.2, allocation="uniform", **extra):
    stages = [{"method": "structured", "ratio": ratio, "allocation": allocation, **extra.pop("structured", {})}, *extra.pop("after", [])]
    return recipe.from_dict({"name": "s", "stages": stages, "calibration": {"samples": 4, "seq_len": 32}})


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _data(seed=0, n=400, width=48, out=24):
    g = torch.Generator().manual_seed(seed)
    # correlated channels, so some are (nearly) combinations of others
    Z = torch.randn(n, width // 2, generator=g, dtype=torch.float64) @ torch.randn(width // 2, width, generator=g, dtype=torch.float64)
    Z = Z + 0.05 * torch.randn(n, width, generator=g, dtype=torch.float64)
    W = torch.randn(out, width, generator=g, dtype=torch.float64)
    return Z, W


def test_refit_equals_float64_least_squares():
    Z, W = _data()
    C = Z.T @ Z / Z.shape[0]
    kept = keep_set(channel_scores(C, W).argsort(descending=True), 20)
    ours = refit_down(C, W, kept, damp=0.0)
    ref = torch.linalg.lstsq(Z[:, kept], Z @ W.T).solution.T
    assert torch.allclose(ours, ref, rtol=1e-8, atol=1e-8)


def test_refit_beats_dropping_columns():
    Z, W = _data(1)
    C = Z.T @ Z / Z.shape[0]
    kept = keep_set(channel_scores(C, W).argsort(descending=True), 16)
    y = Z @ W.T
    refit = (Z[:, kept] @ refit_down(C, W, kept).T - y).square().sum()
    dropped = (Z[:, kept] @ W[:, kept].T - y).square().sum()
    assert refit < 0.5 * dropped


@pytest.mark.parametrize("selection", ["energy", "leverage", "greedy"])
def test_error_curve_matches_direct_refits(selection):
    Z, W = _data(2)
    C = Z.T @ Z / Z.shape[0]
    order = channel_order(C, W, selection, keep=5)
    curve = error_curve(C, W, order, damp=0.0)
    y = Z @ W.T
    assert curve[0] == pytest.approx(1.0)
    assert curve[-1] == pytest.approx(0.0, abs=1e-8)
    for k in (5, 17, 30):
        S = order[:k]
        fit = torch.linalg.lstsq(Z[:, S], y).solution
        direct = (Z[:, S] @ fit - y).square().sum() / y.square().sum()
        assert float(curve[k]) == pytest.approx(float(direct), rel=1e-6, abs=1e-9)
    assert bool((curve[1:] <= curve[:-1] + 1e-12).all())


def _refit_error(Z, W, S):
    y = Z @ W.T
    fit = torch.linalg.lstsq(Z[:, S], y).solution
    return float((Z[:, S] @ fit - y).square().sum())


def test_elimination_drops_what_costs_least_given_the_others():
    Z, W = _data(3, width=10, out=6)
    C = Z.T @ Z / Z.shape[0]
    order = elimination_order(C, W, keep=9, damp=0.0)
    brute = min(range(10), key=lambda j: _refit_error(Z, W, [i for i in range(10) if i != j]))
    assert int(order[-1]) == brute
    # every prefix from `keep` up is a set the elimination passed through
    order = elimination_order(C, W, keep=4, damp=0.0)
    assert sorted(order.tolist()) == list(range(10))
    for k in (4, 6, 9):
        S = order[:k]
        ref = _refit_error(Z, W, S) / float((Z @ W.T).square().sum())
        assert float(error_curve(C, W, order, damp=0.0)[k]) == pytest.approx(ref, rel=1e-6, abs=1e-10)


def test_greedy_beats_per_channel_scores_on_redundant_channels():
    Z, W = _data(4, width=48, out=24)
    C = Z.T @ Z / Z.shape[0]
    for k in (16, 24, 32):
        greedy = _refit_error(Z, W, keep_set(channel_order(C, W, "greedy", k), k))
        energy = _refit_error(Z, W, keep_set(channel_order(C, W, "energy", k), k))
        assert greedy <= energy * (1 + 1e-9)


def test_allocation_takes_from_the_flattest_curve():
    flat = torch.linspace(0.5, 0.0, 65)  # each removed channel costs a lot
    steep = torch.cat([torch.full((33,), 0.01), torch.linspace(0.01, 0.0, 32)])  # its first half is nearly free
    widths = allocate_widths([flat, steep], keep_total=96, step=8, floor=8)
    assert sum(widths) <= 96 and widths[0] > widths[1]
    with pytest.raises(CompressorError, match="min_keep"):
        allocate_widths([flat, steep], keep_total=8, step=8, floor=32)


def test_full_width_leaves_the_model_unchanged():
    model = tiny_model("llama")
    before = logits(model)
    result = compress(model, structured(ratio=1e-9, structured={"multiple_of": 1}), tokenizer=_tok(), **CALIB)
    assert result.report["structured"]["widths"] == {"0": 96, "1": 96}
    assert torch.equal(logits(result.model), before)


def _tok():
    from conftest import byte_tokenizer

    return byte_tokenizer()


def test_refit_on_a_real_layer_equals_float64_least_squares(arch):
    """Layer 0's new down_proj is the float64 least-squares fit of the dense MLP's output on the
    calibration windows from the kept channels' activations (layer 0's input is the same before and
    after, so this can be checked from outside)."""
    from compressor.calibration.windows import calibration_windows

    dense = tiny_model(arch)
    model = tiny_model(arch)
    recipe_ = structured(structured={"damp": 0.0})
    result = compress(model, recipe_, tokenizer=_tok(), **CALIB)
    mlp = models.arch_for(dense).mlp
    layer0, new0 = models.decoder_layers(dense)[0], models.decoder_layers(result.model)[0]
    captured = []
    hook = layer0.get_submodule(mlp.output).register_forward_hook(lambda m, a, o: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    windows = calibration_windows(recipe_, _tok(), None, CALIB["samples"], CALIB["seq_len"])
    with torch.no_grad():
        dense(input_ids=windows)
    hook.remove()
    Z = torch.cat(captured).double()
    W = models.weight_of(layer0.get_submodule(mlp.output)).detach().double()
    old_rows = models.weight_of(layer0.get_submodule(mlp.inputs[0])).detach()
    new_rows = models.weight_of(new0.get_submodule(mlp.inputs[0])).detach()
    kept = torch.tensor([int((old_rows == r).all(1).nonzero()[0]) for r in new_rows])
    ref = torch.linalg.lstsq(Z[:, kept], Z @ W.T).solution.T
    ours = models.weight_of(new0.get_submodule(mlp.output)).detach().double()
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "starcoder2", "gpt2", "gpt_bigcode"])
def test_uniform_export_is_a_standard_checkpoint(arch, tmp_path):
    model = tiny_model(arch)
    out = tmp_path / "out"
    result = compress(model, structured(), out, tokenizer=_tok(), **CALIB)
    mlp = models.arch_for(result.model).mlp
    widths = set(result.report["structured"]["widths"].values())
    # 96 channels, 20 % of all decoder-linear parameters; on 64-wide layers the default step is 1
    k = uniform_width(tiny_model(arch), 0.2, 1)[1]
    assert widths == {k} and result.report["structured"]["multiple_of"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config[mlp.config_key] == k and "auto_map" not in config
    assert not (out / "modeling_compressed.py").exists()
    assert result.report["linear_params_after"] < result.report["linear_params_before"]
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(plain).__name__ == type(model).__name__
    assert torch.allclose(logits(plain), logits(result.model), atol=1e-4)
    assert torch.allclose(logits(compressor.load(out)), logits(result.model), atol=1e-4)


def test_budget_widths_reload_through_the_shim(tmp_path):
    model = tiny_model("llama", seed=3)
    with torch.no_grad():  # make layer 1's MLP nearly redundant, so the budget should cut it harder
        model.model.layers[1].mlp.down_proj.weight[:, 48:] *= 1e-3
    out = tmp_path / "out"
    result = compress(model, structured(ratio=0.2, allocation="budget", structured={"min_keep": 0.3, "multiple_of": 16}), out, tokenizer=_tok(), **CALIB)
    widths = result.report["structured"]["widths"]
    assert widths["0"] > widths["1"] and sum(widths.values()) <= 128
    assert result.report["structured"]["standard_architecture"] is False
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" in config and config["intermediate_size"] == 96
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert remote.model.layers[1].mlp.down_proj.in_features == widths["1"]
    assert torch.allclose(logits(remote), logits(result.model), atol=1e-4)
    assert torch.allclose(logits(compressor.load(out)), logits(result.model), atol=1e-4)


def test_sequential_calibration_sees_the_compressed_layers():
    """Layer 1 is fitted on what the narrowed layer 0 outputs: its kept set differs from a fit on the dense model's inputs."""
    model = tiny_model("llama", seed=4)
    result = compress(model, structured(ratio=0.3), tokenizer=_tok(), **CALIB)
    errors = result.report["structured"]["relative_output_error"]
    assert set(errors) == {"0", "1"} and all(0 < e < 1 for e in errors.values())


def test_structured_then_gptq_then_eora_composes(tmp_path):
    model = tiny_model("llama")
    after = [{"method": "gptq", "bits": 4, "group_size": 32}, {"method": "eora", "rank": 4, "sequential": True}]
    out = tmp_path / "out"
    result = compress(model, structured(after=after), out, tokenizer=_tok(), **CALIB)
    down = result.model.model.layers[0].mlp.down_proj
    assert down.in_features == 64
    reloaded = compressor.load(out)
    assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 64 and (out / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("bad, match", [
    ({"allocation": "greedy"}, "allocation"),
    ({"selection": "random"}, "selection"),
    ({"multiple_of": 0}, "multiple_of"),
    ({"targets": ["self_attn.*"]}, "attention"),
])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(CompressorError, match=match):
        structured(structured=bad)


def test_too_large_a_ratio_is_refused():
    with pytest.raises(CompressorError, match="smaller"):
        compress(tiny_model("llama"), structured(ratio=0.9), tokenizer=_tok(), **CALIB)


def test_rank_stage_and_loss_weighting_are_refused():
    with pytest.raises(CompressorError, match="use one of them"):
        compress(tiny_model("llama"), structured(after=[{"method": "whiten", "ratio": 0.1}]), tokenizer=_tok(), **CALIB)
    after = [{"method": "gptq", "bits": 4, "group_size": 32}, {"method": "eora", "rank": 4, "sequential": True, "weighting": "loss"}]
    with pytest.raises(CompressorError, match="weighting: output"):
        compress(tiny_model("llama"), structured(after=after), tokenizer=_tok(), **CALIB)


# ----------------------------------------------------------------------------- the previous implementation, as the reference


def reference_elimination_order(C, W_down, keep, damp=1e-6, max_steps=512):
    """elimination_order as it was before the downdates were blocked: every step downdates and
    compacts the whole P (the same channels, 4-5x the memory traffic)."""
    C, W = C.double(), W_down.double()
    n = C.shape[0]
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    P = torch.linalg.inv(C + damp * C.diagonal().mean().clamp_min(1e-30) * eye)
    B = P @ (C @ W.T)
    index = torch.arange(n, device=C.device)
    dropped = []
    todo = n - keep
    per_step = max(1, -(-todo // max_steps))
    while todo > 0:
        cost = B.square().sum(1) / P.diagonal().clamp_min(1e-300)
        J = cost.topk(min(per_step, todo), largest=False).indices
        PJ = P[J]
        m = P.shape[0]
        solve = torch.linalg.solve(PJ[:, J], torch.cat([PJ, B[J]], dim=1))
        P.addmm_(PJ.T, solve[:, :m], alpha=-1)
        B.addmm_(PJ.T, solve[:, m:], alpha=-1)
        dropped.append(index[J])
        todo -= len(J)
        alive = torch.ones(m, dtype=torch.bool, device=C.device)
        alive[J] = False
        P, B, index = P[alive][:, alive], B[alive], index[alive]
    energy = channel_scores(C, W)[index]
    first = index[energy.argsort(descending=True)]
    rest = torch.cat(dropped[::-1]) if dropped else first.new_zeros(0)
    return torch.cat([first, rest])


def reference_refit_error(C, W_down, kept, damp=1e-6):
    """The refit by LU and its relative output error by the full products, as shrink computed them."""
    C, W = C.double(), W_down.double()
    Css = C[kept][:, kept]
    Css = Css + damp * Css.diagonal().mean().clamp_min(1e-30) * torch.eye(len(kept), dtype=C.dtype)
    new = torch.linalg.solve(Css, C[kept] @ W.T).T
    total = (W @ C @ W.T).trace()
    diff = total - 2 * (new @ C[kept] @ W.T).trace() + (new @ C[kept][:, kept] @ new.T).trace()
    return new, float(diff / total)


def _swiglu_problem(width, hidden=24, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, hidden, dtype=torch.float64)
    gate, up = torch.randn(2, hidden, width, generator=g, dtype=torch.float64)
    z = torch.nn.functional.silu(x @ gate) * (x @ up)
    z = z + 0.01 * torch.randn(tokens, width, generator=g, dtype=torch.float64)
    return z.T @ z / tokens, torch.randn(hidden, width, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("width,keep,max_steps,block,seed", [(200, 120, 512, 64, 0), (200, 40, 512, 8, 1), (300, 96, 50, 16, 2), (97, 1, 512, 64, 3),
                                                          (128, 127, 512, 64, 4)])
def test_blocked_elimination_picks_the_channels_of_the_plain_one(width, keep, max_steps, block, seed):
    C, W = _swiglu_problem(width, seed=seed)
    ours = elimination_order(C, W, keep, max_steps=max_steps, block=block)
    assert torch.equal(ours, reference_elimination_order(C, W, keep, max_steps=max_steps))
    assert sorted(ours.tolist()) == list(range(width))


@pytest.mark.parametrize("damp", [0.0, 1e-6, 1e-2])
def test_refit_error_equals_the_full_products(damp):
    C, W = _swiglu_problem(160, seed=5)
    kept = keep_set(elimination_order(C, W, 100), 100)
    new, err = refit_with_error(C, W, kept, damp)
    ref_new, ref_err = reference_refit_error(C, W, kept, damp)
    assert torch.allclose(new, ref_new, rtol=1e-8, atol=1e-10 * ref_new.abs().max())
    assert err == pytest.approx(ref_err, rel=1e-7, abs=1e-12)

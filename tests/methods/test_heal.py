"""Block-wise healing: it lowers a compressed layer's output error against the dense layer below
the closed form's (on windows it never saw), never raises it on the held-back windows, stops
early and restores when the fit overfits, is deterministic, keeps shapes and the standard export,
and composes with GPTQ and EoRA."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

import compressor
from compressor import models, recipe
from compressor.api import compress
from compressor.calibration import driver
from compressor.calibration.collect import GramCollector
from compressor.errors import CompressorError
from compressor.methods.base import Method
from compressor.methods.heal import Heal, HealConfig, fit_layer, held_out_error
from compressor.methods.structured import Structured, StructuredConfig
from compressor.methods.whiten import Whiten

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
NO_SEQ = SimpleNamespace(true_sequential=False)


def windows(n: int, seed: int = 0, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def stages(*built: Method) -> list[Method]:
    for s in built:
        s.bind(list(built), NO_SEQ)
    return list(built)


def compressed(heal: dict | None, ratio: float = 0.4, calib: torch.Tensor | None = None, batch_size: int = 2, first=None):
    """A tiny llama after structured (or `first`) and, with `heal` options, healing; plus its stages."""
    model = tiny_model("llama")
    first = first or Structured(StructuredConfig(ratio=ratio))
    built = stages(first, *([Heal(HealConfig(**heal))] if heal is not None else []))
    driver.run(model, built, torch.device("cpu"), windows(16) if calib is None else calib, batch_size)
    return model, built


def layer0_error(model, dense, tokens: torch.Tensor) -> float:
    """||layer0(x) - dense_layer0(x)||^2 / ||dense_layer0(x) - x||^2 in float64 on the inputs `tokens` give layer 0."""
    acts = driver.capture(dense, tokens, 4, torch.device("cpu"))
    a = driver.run_layer(models.decoder_layers(model)[0], acts, 0)
    b = driver.run_layer(models.decoder_layers(dense)[0], acts, 0)
    err = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b))
    ref = sum(float((y.double() - h.double()).square().sum()) for y, h in zip(b, acts.hidden))
    return err / ref


def test_healing_lowers_the_layer_error_below_the_closed_form_on_unseen_windows():
    dense = tiny_model("llama")
    closed, _ = compressed(None)
    healed, built = compressed({"steps": 200, "lr": 1e-4, "target": "own"})
    fresh = windows(8, seed=99)  # never seen by the fit nor by the early stop
    before, after = layer0_error(closed, dense, fresh), layer0_error(healed, dense, fresh)
    assert after < 0.9 * before, (before, after)
    fit = built[1].fits[0]
    assert fit.after < fit.before and not fit.kept_start and 0 < fit.steps <= 200


@pytest.mark.parametrize("target", ["own", "dense"])
def test_the_held_out_error_never_rises_and_matches_the_report(target):
    model, built = compressed({"steps": 60, "lr": 3e-3, "target": target})  # a rate high enough that some layers get worse
    for i, fit in built[1].fits.items():
        assert fit.after <= fit.before
    report = built[1].report(model, {})["heal"]
    assert set(report["layers"]) == {"0", "1"} and report["steps"] == sum(f.steps for f in built[1].fits.values())
    assert report["seconds"] >= 0


def _overfit_case():
    """A compressed layer 0 with 2 calibration windows (one batch to fit, one held back)."""
    model = tiny_model("llama")
    built = stages(Structured(StructuredConfig(ratio=0.4)))
    calib = windows(2, seed=5)
    driver.run(model, built, torch.device("cpu"), calib, 1)
    dense = tiny_model("llama")
    acts = driver.capture(dense, calib, 1, torch.device("cpu"))
    targets = driver.run_layer(models.decoder_layers(dense)[0], acts, 0)
    layer = models.decoder_layers(model)[0]
    params = [p for n, p in layer.named_parameters() if "mlp" in n]
    return layer, params, acts.hidden, acts.calls[0], targets


def test_early_stop_restores_the_start_when_the_fit_only_overfits():
    layer, params, inputs, calls, targets = _overfit_case()
    start = [p.detach().clone() for p in params]
    # Many steps at a high rate on one window: the held-back window's error only rises.
    fit = fit_layer(layer, params, inputs, calls, targets, HealConfig(steps=300, lr=5e-2, holdout=0.5, eval_every=5, patience=2))
    assert fit.steps < 300  # stopped early
    assert fit.kept_start and fit.after == fit.before
    assert all(torch.equal(p, s) for p, s in zip(params, start))  # the closed form, bit for bit
    hold = torch.randperm(2, generator=torch.Generator().manual_seed(0)).tolist()[:1]  # fit_layer's split for seed 0, layer 0
    assert held_out_error(layer, hold, inputs, calls, targets, torch.float32) == pytest.approx(fit.before, rel=1e-9)


def test_the_kept_state_is_the_best_held_out_one():
    layer, params, inputs, calls, targets = _overfit_case()
    cfg = HealConfig(steps=40, lr=1e-4, holdout=0.5, eval_every=5, patience=100)
    fit = fit_layer(layer, params, inputs, calls, targets, cfg)
    hold = torch.randperm(2, generator=torch.Generator().manual_seed(0)).tolist()[:1]
    assert held_out_error(layer, hold, inputs, calls, targets, torch.float32) == pytest.approx(fit.after, rel=1e-9)
    assert fit.after <= fit.before


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = compressed({"steps": 30, "seed": 1})
    b, _ = compressed({"steps": 30, "seed": 1})
    c, _ = compressed({"steps": 30, "seed": 2})
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_only_the_compressed_linears_move_unless_asked():
    dense = tiny_model("llama")
    healed, _ = compressed({"steps": 30})
    before, after = dense.state_dict(), healed.state_dict()
    for key in after:
        if "mlp" not in key:
            assert torch.equal(after[key], before[key]), key
    normed, _ = compressed({"steps": 30, "train_norms": True, "lr": 1e-3})
    moved = [k for k, v in normed.state_dict().items() if "norm" in k and "layers." in k and not torch.equal(v, before[k])]
    assert moved


def test_both_factors_of_a_rank_stage_are_healed():
    whitened, _ = compressed(None, first=Whiten(Whiten.Config(ratio=0.5)))
    healed, built = compressed({"steps": 100, "target": "own", "lr": 3e-4}, first=Whiten(Whiten.Config(ratio=0.5)))
    assert not built[1].fits[1].kept_start
    a, b = whitened.state_dict(), healed.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert any(k.endswith("up.weight") for k in changed) and any(k.endswith("down.weight") for k in changed)


class _Probe(Method):
    """A later stage that records the Grams it is given."""

    name, kind, needs_gram = "probe", "quant", True

    def __init__(self):
        super().__init__(SimpleNamespace(targets=["*"]))
        self.grams: dict[int, dict] = {}

    def apply(self, work):
        self.grams[work.index] = work.grams


def test_later_stages_get_the_grams_of_the_healed_layer():
    model = tiny_model("llama")
    probe = _Probe()
    built = stages(Structured(StructuredConfig(ratio=0.4)), Heal(HealConfig(steps=40, target="own")), probe)
    calib = windows(16)
    driver.run(model, built, torch.device("cpu"), calib, 2)
    assert not built[1].fits[0].kept_start
    acts = driver.capture(model, calib, 2, torch.device("cpu"))
    layer = models.decoder_layers(model)[0]
    linears = models.layer_linears(model, layer)
    groups = models.arch_for(model).linears
    collector = GramCollector(linears, groups)
    driver.run_layer(layer, acts, 0)
    collector.close()
    want = collector.grams()
    for group, gram in want.items():
        assert torch.allclose(probe.grams[0][group], gram, rtol=1e-6, atol=1e-9), group


def _recipe(*extra: dict, ratio: float = 0.2) -> recipe.Recipe:
    return recipe.from_dict({"name": "h", "stages": [{"method": "structured", "ratio": ratio}, *extra],
                             "calibration": {"samples": 8, "seq_len": 32, "batch_size": 2}})


def test_uniform_structured_heal_keeps_the_standard_export(tmp_path):
    out = tmp_path / "out"
    result = compress(tiny_model("llama"), _recipe({"method": "heal", "steps": 30}), out, tokenizer=byte_tokenizer(), device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 64 and "auto_map" not in config
    assert "heal" in result.report and result.report["heal"]["layers"]
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(logits(plain), logits(result.model), atol=1e-4)
    assert torch.allclose(logits(compressor.load(out)), logits(result.model), atol=1e-4)


def test_structured_heal_gptq_eora_runs_and_exports(tmp_path):
    out = tmp_path / "out"
    rec = _recipe({"method": "heal", "steps": 30}, {"method": "gptq", "bits": 4, "group_size": 32},
                  {"method": "eora", "rank": 4, "sequential": True})
    result = compress(tiny_model("llama"), rec, out, tokenizer=byte_tokenizer(), device="cpu")
    assert {"heal", "quantization", "adapters"} <= set(result.report)
    assert (out / "adapter").is_dir()
    assert torch.allclose(logits(compressor.load(out)), logits(result.model), atol=1e-4)


def test_heal_changes_what_gptq_quantises():
    plain = compress(tiny_model("llama"), _recipe({"method": "gptq", "bits": 4, "group_size": 32}, ratio=0.4), None,
                     tokenizer=byte_tokenizer(), device="cpu")
    healed = compress(tiny_model("llama"), _recipe({"method": "heal", "steps": 40, "target": "own"}, {"method": "gptq", "bits": 4, "group_size": 32},
                                                   ratio=0.4), None, tokenizer=byte_tokenizer(), device="cpu")
    assert not all(healed.report["heal"]["layers"][i]["kept_start"] for i in ("0", "1"))
    assert not torch.equal(logits(plain.model), logits(healed.model))


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": 0}, {"holdout": 1.0}, {"train": "some"}, {"target": "x"}, {"train_norms": "yes"},
                                 {"patience": 0}, {"targets": []}])
def test_bad_options_name_the_key(bad):
    with pytest.raises(CompressorError, match=next(iter(bad))):
        HealConfig(**bad)


def test_recipe_rules():
    with pytest.raises(CompressorError, match="earlier stage"):
        recipe.from_dict({"name": "h", "stages": [{"method": "heal"}]})
    with pytest.raises(CompressorError, match="must come before"):
        recipe.from_dict({"name": "h", "stages": [{"method": "gptq", "bits": 4}, {"method": "heal"}]})
    with pytest.raises(CompressorError, match="propagation"):
        recipe.from_dict({"name": "h", "stages": [{"method": "whiten"}, {"method": "heal"}, {"method": "gptq", "bits": 4},
                                                  {"method": "eora", "rank": 4, "propagation": 0.25}]})
    with pytest.raises(CompressorError, match="true_sequential"):
        recipe.from_dict({"name": "h", "stages": [{"method": "whiten"}, {"method": "heal"}], "calibration": {"true_sequential": True}})
    recipe.from_dict({"name": "h", "stages": [{"method": "whiten", "ratio": 0.2}, {"method": "heal"}]})


def test_a_bfloat16_layer_is_fitted_in_float32_and_never_worse():
    layer, params, inputs, calls, targets = _overfit_case()
    layer = copy.deepcopy(layer).to(torch.bfloat16)
    params = [p for n, p in layer.named_parameters() if "mlp" in n]
    inputs = [x.to(torch.bfloat16) for x in inputs]
    fit = fit_layer(layer, params, inputs, calls, targets, HealConfig(steps=20, lr=1e-4, holdout=0.5, eval_every=5))
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert fit.after <= fit.before
    assert isinstance(layer, nn.Module)


class _Recorder(Method):
    """A stage that asks for the layer's inputs and targets, records them, then changes the layer."""

    name, kind, needs_gram = "recorder", "quant", True

    def __init__(self, dense_stream: bool):
        super().__init__(SimpleNamespace(targets=["*"]))
        self.dense_stream = dense_stream
        self.seen: dict[int, tuple] = {}

    def needs_layer_io(self):
        return True

    def needs_dense_stream(self):
        return self.dense_stream

    def apply(self, work):
        self.seen[work.index] = (list(work.inputs), list(work.calls), list(work.own_targets), None if work.targets is None else list(work.targets))
        with torch.no_grad():
            work.layer.mlp.down_proj.weight.mul_(0.5)  # so the compressed stream leaves the dense one


@pytest.mark.parametrize("dense_stream", [False, True])
def test_the_driver_gives_a_layer_its_inputs_and_the_dense_outputs(dense_stream):
    model, dense = tiny_model("llama"), tiny_model("llama")
    rec = _Recorder(dense_stream)
    calib = windows(6)
    driver.run(model, [rec], torch.device("cpu"), calib, 2)
    acts = driver.capture(dense, calib, 2, torch.device("cpu"))
    dense_in = acts.hidden
    for i, layer in enumerate(models.decoder_layers(dense)):
        inputs, calls, own, targets = rec.seen[i]
        assert len(inputs) == len(calls) == len(own) == 3
        # own_targets: the dense layer on the compressed model's inputs
        want_own = [driver._forward(layer, x, c) for x, c in zip(inputs, calls)]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(own, want_own))
        if dense_stream:  # targets: the dense layer on the dense model's inputs
            want = driver.run_layer(layer, SimpleNamespace(hidden=dense_in, calls={i: acts.calls[i]}), i)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(targets, want))
            dense_in = want
        else:
            assert targets is None
    inputs1 = rec.seen[1][0]
    assert not torch.allclose(inputs1[0], driver.run_layer(models.decoder_layers(dense)[0], acts, 0)[0])  # layer 1 saw the changed layer 0


def test_whiten_heal_exports_and_reloads(tmp_path):
    out = tmp_path / "out"
    rec = recipe.from_dict({"name": "wh", "stages": [{"method": "whiten", "ratio": 0.3}, {"method": "heal", "steps": 30, "lr": 3e-4}],
                            "calibration": {"samples": 8, "seq_len": 32, "batch_size": 2}})
    result = compress(tiny_model("llama"), rec, out, tokenizer=byte_tokenizer(), device="cpu")
    assert result.report["heal"]["layers"] and any(not f["kept_start"] for f in result.report["heal"]["layers"].values())
    assert torch.allclose(logits(compressor.load(out)), logits(result.model), atol=1e-4)

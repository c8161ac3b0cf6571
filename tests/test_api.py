"""Recipes that chain rank reduction, GPTQ and EoRA: one walk, exports in standard formats, reloads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import compressor
from compressor import models, modules, recipe
from compressor.api import compress
from compressor.calibration.windows import calibration_windows
from compressor.errors import CompressorError
from compressor.methods.gptq import format as gptq_v1

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
CALIB = dict(samples=4, seq_len=32, device="cpu")


def shipped(name: str, group_size: int = 32, **eora):
    """A shipped recipe with a group size the tiny models' 64/96-wide layers allow."""
    data = recipe.load(name).to_dict()
    for stage in data["stages"]:
        if stage["method"] == "gptq":
            stage["group_size"] = group_size
        if stage["method"] == "eora":
            stage.update(eora)
    return recipe.from_dict(data, source=name)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def without_adapters(model):
    for name, m in list(model.named_modules()):
        if isinstance(m, modules.LoraAdapted):
            model.set_submodule(name, m.base)
    return model


@pytest.mark.parametrize("arch,name", [(a, n) for n in ("gptq4", "gptq4-eora32", "welore30-gptq4-eora") for a in ("gpt2", "mistral", "qwen3")]
                         + [("qwen3", "whiten30-gptq4-eora"), ("gpt2", "whiten30-gptq4-eora+true_sequential")])
def test_compress_export_reload(arch, name, tokenizer, tmp_path):
    out = tmp_path / "out"
    base, _, option = name.partition("+")
    rec = shipped(base) if not option else _with_calibration(shipped(base), **{option: True})
    result = compress(tiny_model(arch), rec, out, tokenizer=tokenizer, **CALIB)
    expected = logits(result.model)
    assert torch.isfinite(expected).all()
    # compressor.load applies the PEFT adapter itself; the remote-code class loads the base
    assert (logits(compressor.load(out)) - expected).abs().max() <= 1e-4
    ours = compressor.load(out, adapter=False)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert (logits(remote) - logits(ours)).abs().max() <= 1e-5
    if "eora" in name:
        from peft import PeftModel

        # fp32 throughout, the same arithmetic as our own forward: equal to rounding.
        peft_model = PeftModel.from_pretrained(compressor.load(out, adapter=False), out / "adapter").eval()
        assert (logits(peft_model) - expected).abs().max() <= 1e-4
        expected = logits(without_adapters(result.model))
    assert (logits(ours) - expected).abs().max() <= 1e-4

    report = json.loads((out / "compression_report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert report["quantization"]["bits"] == 4 and report["bits_per_dense_weight"] < 8
    if "eora" in name:
        removed = report["adapters"]["error_removed"]
        assert set(removed) == set(report["adapters"]["ranks"]) and all(0 < v <= 1 for v in removed.values())
    assert config["compression"]["modules"]
    if name.startswith(("welore30", "whiten30")):
        assert "quantization_config" not in config  # low-rank layers are not a GPTQ layout
        assert any(spec["type"] == "lowrank" and spec["quant"]["bits"] == 4 for spec in config["compression"]["modules"].values())
    else:
        assert config["quantization_config"]["quant_method"] == "gptq"


def test_gptq_v1_tensors(tokenizer, tmp_path):
    out = tmp_path / "out"
    result = compress(tiny_model("llama"), shipped("gptq4"), out, tokenizer=tokenizer, **CALIB)
    tensors = load_file(out / "model.safetensors")
    qcfg = json.loads((out / "quantize_config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == qcfg
    assert {k: qcfg[k] for k in ("bits", "group_size", "desc_act", "sym", "lm_head", "quant_method", "checkpoint_format")} == {
        "bits": 4, "group_size": 32, "desc_act": True, "sym": True, "lm_head": False, "quant_method": "gptq", "checkpoint_format": "gptq"}
    assert qcfg["dynamic"] == {}
    for full, _, module in models.iter_linears_any(result.model):
        out_f, in_f = module.out_features, module.in_features
        assert f"{full}.weight" not in tensors
        t = {k: tensors[f"{full}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert (t["qweight"].dtype, tuple(t["qweight"].shape)) == (torch.int32, (in_f * 4 // 32, out_f))
        assert (t["qzeros"].dtype, tuple(t["qzeros"].shape)) == (torch.int32, (in_f // 32, out_f * 4 // 32))
        assert (t["scales"].dtype, tuple(t["scales"].shape)) == (torch.float16, (in_f // 32, out_f))
        # act_order: columns are quantised by decreasing activation energy, so g_idx is a
        # permutation of the contiguous layout: every group still holds exactly 32 columns.
        assert t["g_idx"].dtype == torch.int32
        assert torch.equal(t["g_idx"].sort().values, torch.arange(in_f, dtype=torch.int32) // 32)
        assert torch.equal(gptq_v1.dequantize_gptq_v1(t, 4, in_f, out_f), module.dequantized_weight())
    assert report_bits(out) == pytest.approx(gptq_v1.effective_bits(4, 32, 64, 64), rel=0.2)


def report_bits(out):
    return json.loads((out / "compression_report.json").read_text())["quantization"]["effective_bits"]


def test_gptq_beats_rtn_end_to_end(tokenizer):
    """On a real forward: GPTQ's logits are closer to the dense model's than round-to-nearest's."""
    dense = logits(tiny_model("llama"))
    errs = {}
    for method in ("gptq", "rtn"):
        rec = recipe.from_dict({"stages": [{"method": method, "bits": 3, "group_size": 32}]})
        errs[method] = (logits(compress(tiny_model("llama"), rec, tokenizer=tokenizer, **CALIB).model) - dense).norm()
    assert errs["gptq"] < errs["rtn"]


def test_eora_reduces_error_and_non_sequential_keeps_gptq_base(tokenizer, tmp_path):
    rec = shipped("gptq4-eora32", rank=16, sequential=False, propagation=0, refine=0, rank_pattern={"mlp.*": 24}, rank_allocation="uniform")
    # EoRA fits the calibration distribution, so it is judged on calibration-like text.
    ids = calibration_windows(rec, tokenizer, None, samples=4, seq_len=32)
    run = lambda m: m(ids).logits.detach()  # noqa: E731
    dense = run(tiny_model("qwen2"))
    plain = compress(tiny_model("qwen2"), shipped("gptq4"), tokenizer=tokenizer, **CALIB).model
    adapted = compress(tiny_model("qwen2"), rec, tmp_path / "out", tokenizer=tokenizer, **CALIB).model
    assert (run(adapted) - dense).norm() < 0.7 * (run(plain) - dense).norm()
    # sequential: false calibrates later layers without adapters: the base is the plain GPTQ run.
    for (n, _, a), (_, _, b) in zip(models.iter_linears_any(without_adapters(adapted)), models.iter_linears_any(plain)):
        assert torch.equal(a.qweight, b.qweight), n

    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    assert set(cfg["rank_pattern"].values()) == {24} and cfg["alpha_pattern"] == cfg["rank_pattern"]
    weights = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    a = weights["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert tuple(a.shape) == (24, 64) and tuple(b.shape) == (64, 16)


def test_per_type_allocation_keeps_the_budget_and_exports(tokenizer, tmp_path):
    uniform = compress(tiny_model("llama"), shipped("gptq4-eora32", rank=4, sequential=False, propagation=0, refine=0, rank_allocation="uniform"),
                       tokenizer=tokenizer, **CALIB)
    out = tmp_path / "out"
    result = compress(tiny_model("llama"), shipped("gptq4-eora32", rank=4, sequential=False, propagation=0, refine=0, rank_allocation="per-type"), out,
                      tokenizer=tokenizer, **CALIB)
    params = lambda r: r.report["adapters"]["params"]  # noqa: E731
    got = result.report["adapters"]["ranks"]
    assert params(result) <= params(uniform) and len(set(got.values())) > 1 and max(got.values()) <= 16
    # every matrix type keeps its own budget: q_proj's ranks over the layers sum to at most 2 x 4.
    assert sum(r for n, r in got.items() if n.endswith("q_proj")) <= 8
    from peft import PeftModel

    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(got)
    reloaded = PeftModel.from_pretrained(compressor.load(out, adapter=False), out / "adapter").eval()
    assert (logits(reloaded) - logits(result.model)).abs().max() <= 1e-4


@pytest.mark.parametrize("weighting", ["loss", "loss-full"])
def test_loss_weighting_end_to_end(tokenizer, tmp_path, weighting):
    """weighting: loss (or loss-full) changes the adapters (not the GPTQ base), is recorded, and
    PEFT loads them."""
    plain = compress(tiny_model("llama"),
                     shipped("gptq4-eora32", rank=4, sequential=False, propagation=0, refine=0, rank_allocation="uniform", weighting="output"),
                     tokenizer=tokenizer, **CALIB).model
    out = tmp_path / "out"
    result = compress(tiny_model("llama"),
                      shipped("gptq4-eora32", rank=4, sequential=False, propagation=0, refine=0, rank_allocation="uniform", weighting=weighting),
                      out, tokenizer=tokenizer, **CALIB)
    name, weighted = next((n, m) for n, _, m in models.iter_linears_any(result.model))
    unweighted = plain.get_submodule(name)
    assert torch.equal(weighted.base.qweight, unweighted.base.qweight)
    assert not torch.allclose(weighted.lora_B.weight, unweighted.lora_B.weight, atol=1e-3)
    assert result.report["recipe"]["stages"][1]["weighting"] == weighting
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(compressor.load(out, adapter=False), out / "adapter").eval()
    assert (logits(reloaded) - logits(result.model)).abs().max() <= 1e-4


def test_propagation_brings_the_output_closer_to_the_dense_model(tokenizer, tmp_path):
    """propagation: 1 aims each layer's adapters at the dense model's output, so on calibration
    text the adapted model ends closer to the dense one than with plain (per-layer) EoRA; the
    adapters still export as PEFT LoRA."""
    def run(propagation, out=None):
        rec = shipped("gptq4-eora32", rank=4, sequential=True, rank_allocation="uniform", propagation=propagation, refine=0)
        return compress(tiny_model("llama"), rec, out, tokenizer=tokenizer, **CALIB)

    ids = calibration_windows(shipped("gptq4-eora32"), tokenizer, None, samples=4, seq_len=32)
    outputs = lambda m: m(ids).logits.detach()  # noqa: E731
    dense = outputs(tiny_model("llama"))
    out = tmp_path / "out"
    plain, propagated = run(0.0), run(1.0, out)
    err = {k: (outputs(r.model) - dense).norm().item() for k, r in (("plain", plain), ("propagated", propagated))}
    assert err["propagated"] < 0.95 * err["plain"], err  # 0.084 vs 0.095 when written
    assert propagated.report["recipe"]["stages"][1]["propagation"] == 1.0
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(compressor.load(out, adapter=False), out / "adapter").eval()
    assert (logits(reloaded) - logits(propagated.model)).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_refine_requantises_the_base_and_exports_peft(arch, tokenizer, tmp_path):
    """refine: the base is GPTQ of W - B A, not of W (so it differs from the plain run's codes),
    the recipe records it, and PEFT puts the adapters on the exported base with the same logits
    (GPT-2's Conv1D weights included)."""
    rec = shipped("gptq4-eora32", rank=4, refine=2)
    plain = compress(tiny_model(arch), shipped("gptq4-eora32", rank=4, refine=0), tokenizer=tokenizer, **CALIB).model
    out = tmp_path / "out"
    result = compress(tiny_model(arch), rec, out, tokenizer=tokenizer, **CALIB)
    name, refined = next((n, m) for n, _, m in models.iter_linears_any(result.model))
    assert not torch.equal(refined.base.qweight, plain.get_submodule(name).base.qweight)
    assert result.report["recipe"]["stages"][1]["refine"] == 2
    from peft import PeftModel

    with pytest.warns(UserWarning, match="fitted together with its adapter"):
        base = compressor.load(out, adapter=False)
    assert json.loads((out / "config.json").read_text())["compression"]["adapter"]["required"] is True
    reloaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert (logits(reloaded) - logits(result.model)).abs().max() <= 1e-4


def _with_calibration(rec, **options):
    data = rec.to_dict()
    data["calibration"].update(options)
    return recipe.from_dict(data, source=rec.source)


def test_true_sequential_quantises_o_proj_for_the_quantised_q_k_v(tokenizer):
    """calibration.true_sequential: layer 0's q/k/v read the embeddings either way (same codes);
    its o_proj is GPTQ on the Gram of what the quantised attention really feeds it, which the
    one-pass walk (dense q/k/v) does not give."""
    rec = shipped("gptq4")
    one_pass = compress(tiny_model("llama"), rec, tokenizer=tokenizer, **CALIB).model
    staged = compress(tiny_model("llama"), _with_calibration(rec, true_sequential=True), tokenizer=tokenizer, **CALIB).model
    attn = lambda m: models.decoder_layers(m)[0].self_attn  # noqa: E731
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(attn(staged), name).qweight, getattr(attn(one_pass), name).qweight), name
    assert not torch.equal(attn(staged).o_proj.qweight, attn(one_pass).o_proj.qweight)

    kept = []
    hook = attn(staged).o_proj.register_forward_hook(lambda mod, a, o: kept.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        staged(calibration_windows(rec, tokenizer, None, samples=4, seq_len=32), use_cache=False)
    hook.remove()
    X = kept[0]
    reference, _ = rec.stages[0].quantize_module(attn(tiny_model("llama")).o_proj, X.T @ X / X.shape[0], None)
    assert torch.equal(reference.qweight, attn(staged).o_proj.qweight)


def test_true_sequential_with_propagation_exports_peft(tokenizer, tmp_path):
    """The shipped adapter recipe (sequential, propagation 0.25) under true_sequential: the walk
    carries a dense copy of each layer beside the compressed one; the result reloads through PEFT."""
    out = tmp_path / "out"
    result = compress(tiny_model("llama"), _with_calibration(shipped("gptq4-eora32", rank=4), true_sequential=True), out, tokenizer=tokenizer, **CALIB)
    assert result.report["recipe"]["calibration"]["true_sequential"] is True
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(compressor.load(out, adapter=False), out / "adapter").eval()
    assert (logits(reloaded) - logits(result.model)).abs().max() <= 1e-4


def test_load_refuses_an_adapter_it_cannot_apply_exactly(tokenizer, tmp_path):
    out = tmp_path / "out"
    compress(tiny_model("llama"), shipped("gptq4-eora32", rank=4, sequential=False, propagation=0, refine=0, rank_allocation="uniform"), out,
             tokenizer=tokenizer, **CALIB)
    cfg_path = out / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "lora_alpha": 2 * cfg["r"]}))
    with pytest.raises(CompressorError, match="not a scale-1 adapter as compressor writes them; load the base with adapter=False"):
        compressor.load(out)
    assert not any(isinstance(m, modules.LoraAdapted) for m in compressor.load(out, adapter=False).modules())


def test_quantised_adapters_stay_in_the_checkpoint(tokenizer, tmp_path):
    """bits: 4 quantises A and B (GPTQ with their own Grams); they are written into the model's
    safetensors (no PEFT folder, no GPTQ v1 claim) and every loader gives the in-memory logits."""
    rec = shipped("gptq4-eora32", rank=4, sequential=False, propagation=0, refine=0, rank_allocation="uniform", bits=4)
    ids = calibration_windows(rec, tokenizer, None, samples=4, seq_len=32)
    run = lambda m: m(ids).logits.detach()  # noqa: E731
    dense = run(tiny_model("qwen2"))
    float_adapters = compress(tiny_model("qwen2"), shipped("gptq4-eora32", rank=4, sequential=False, propagation=0, refine=0, rank_allocation="uniform"),
                              tokenizer=tokenizer, **CALIB).model
    out = tmp_path / "out"
    result = compress(tiny_model("qwen2"), rec, out, tokenizer=tokenizer, **CALIB)
    base_err = (run(without_adapters(compress(tiny_model("qwen2"), shipped("gptq4"), tokenizer=tokenizer, **CALIB).model)) - dense).norm()
    err = (run(result.model) - dense).norm()
    # still compensates, and 4-bit adapters cost little of what float ones remove
    assert err < 0.9 * base_err and err < 1.1 * (run(float_adapters) - dense).norm()

    assert not (out / "adapter").exists() and not (out / "quantize_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["compression"]["adapter"]["format"] == "quantized-in-checkpoint"
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.lora_A.qweight"].dtype == torch.int32
    assert tuple(tensors["model.layers.0.self_attn.q_proj.lora_B.qweight"].shape) == (8 * 4 // 32, 64)  # rank 4 padded to 8
    adapters = result.report["adapters"]
    assert adapters["bits"] == 4 and adapters["path"] is None and set(adapters["ranks"].values()) == {4}
    assert result.report["quantization"]["gptq_checkpoint"] is False
    want = logits(result.model)
    assert torch.equal(logits(compressor.load(out)), want)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)), want)


def test_merge_into_lowrank_is_exact(tokenizer, tmp_path):
    rec = recipe.from_dict({"stages": [{"method": "whiten", "ratio": 0.5}, {"method": "eora", "rank": 4, "merge": True}]})
    out = tmp_path / "out"
    result = compress(tiny_model("llama"), rec, out, tokenizer=tokenizer, **CALIB)
    assert not (out / "adapter").exists()
    assert not any(isinstance(m, modules.LoraAdapted) for m in result.model.modules())
    before = {n: r for n, r in compress(tiny_model("llama"), rec.stages[0].name, tokenizer=tokenizer, ratio=0.5, **CALIB).report["per_module"].items()}
    merged = result.report["per_module"]
    assert all(merged[n] == before[n] + 4 for n in merged if before[n] != "dense")
    assert (logits(compressor.load(out)) - logits(result.model)).abs().max() <= 1e-4


@pytest.mark.parametrize("stages, message", [
    ([{"method": "gptq", "bits": 5}], "key 'bits' must be one of 2, 3, 4, 8; got 5"),
    ([{"method": "gptq", "group_size": 48}], "group_size 48 does not divide the 64 input features"),
    ([{"method": "eora", "rank": 8}], "needs a rank-reduction or quantisation stage before it"),
    ([{"method": "eora"}, {"method": "gptq", "group_size": 32}], "must come before 'eora'"),
    ([{"method": "gptq", "group_size": 32}, {"method": "rtn", "group_size": 32}], "only one quant stage"),
    ([{"method": "gptq", "group_size": 32}, {"method": "eora", "merge": True}], "cannot fold adapters into quantised weights"),
    ([{"method": "gptq", "group_size": 32}, {"method": "eora", "rank": 0}], "key 'rank' must be an integer >= 1, got 0"),
    ([{"method": "gptq", "group_size": 32}, {"method": "eora", "rank_allocation": "per-type"}], "needs sequential: false"),
    ([{"method": "gptq", "group_size": 32}, {"method": "eora", "rank_allocation": "best"}],
     "key 'rank_allocation' must be one of uniform, per-type, global; got 'best'"),
    ([{"method": "gptq", "group_size": 32}, {"method": "eora", "weighting": "fisher"}],
     "key 'weighting' must be one of output, loss, loss-full; got 'fisher'"),
    ([{"method": "gptq", "group_size": 32}, {"method": "eora", "bits": 5}], "key 'bits' must be one of 2, 3, 4, 8; got 5"),
    ([{"method": "gptq", "group_size": 32}, {"method": "eora", "propagation": 1.5}], r"key 'propagation' must be a number in \[0, 1\], got 1.5"),
    ([{"method": "gptq", "group_size": 32}, {"method": "eora", "propagation": 1, "sequential": False}],
     "propagation corrects the inputs .* needs sequential: true"),
    ([{"method": "gptq", "group_size": 32}, {"method": "eora", "propagation": 1, "propagation_damp": -0.1}],
     "key 'propagation_damp' must be a number >= 0, got -0.1"),
    ([{"method": "gptq", "group_size": 32}, {"method": "eora", "bits": 4, "sequential": False, "rank_allocation": "per-type"}],
     "bits quantises adapters as they are fitted"),
    ([{"method": "svd", "ratio": 0.3}, {"method": "gptq", "group_size": 32}, {"method": "eora", "refine": 2}],
     "eora refine re-quantises W - B A for dense linears"),
    ([{"method": "svd", "ratio": 0.3}, {"method": "eora", "refine": 2}], "eora refine re-quantises W - B A for dense linears"),
    ([{"method": "gptq", "group_size": 32}, {"method": "eora", "refine": -1}], "key 'refine' must be an integer >= 0, got -1"),
])
def test_bad_input_is_one_line(stages, message, tokenizer):
    with pytest.raises(CompressorError, match=message) as err:
        compress(tiny_model("llama"), recipe.from_dict({"stages": stages}), tokenizer=tokenizer, **CALIB)
    assert "\n" not in str(err.value)

"""A GPTQ export whose linears have their own bit widths: the `dynamic` rules that declare them
(compressor/methods/gptq/format.py), and a checkpoint that reloads with every width intact."""

from __future__ import annotations

import json
import random
import re
import struct

import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from safetensors import safe_open

import compressor
from compressor import models
from compressor.errors import CompressorError
from compressor.export import accounting, checkpoint
from compressor.methods.gptq import Gptq, GptqConfig
from compressor.methods.gptq import format as gptq_v1

GRID = {"bits": 4, "group_size": 32, "sym": True, "desc_act": False}
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
FUSED = {"self_attn.qkv_proj": LINEARS[:3], "mlp.gate_up_proj": LINEARS[4:6]}


def names(layers: int) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(layers) for n in LINEARS]


def config(bits_by_module=None, skipped=(), weights_by_module=None):
    return gptq_v1.quantization_config(GRID, 0.01, False, "gptq", list(skipped), "0.0", bits_by_module=bits_by_module,
                                       weights_by_module=weights_by_module)


def candidates(layers: int) -> list[str]:
    """Every name a loader may ask about, and near misses: layer 1 against 11, a suffix, a prefix."""
    found = names(layers) + [f"model.layers.{i}.{f}" for i in range(layers) for f in FUSED]
    misses = []
    for n in found:
        misses += [n + "_x", n + ".lora_A", "x" + n, n.replace(".", "_", 1), n.replace("model.", "model.model.", 1)]
    return found + misses


def test_uniform_bits_give_the_uniform_config():
    skipped = ["model.layers.1.mlp.down_proj"]
    want = {**GRID, "lm_head": False, "quant_method": "gptq", "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32",
            "damp_percent": 0.01, "static_groups": False, "true_sequential": False,
            "dynamic": {r"-:^model\.layers\.1\.mlp\.down_proj$": {}}, "meta": {"quantizer": ["compressor:0.0"], "method": "gptq"}}
    assert config(skipped=skipped) == want
    uniform = {n: 4 for n in names(2) if n not in skipped}
    assert config(uniform, skipped) == want
    # One width other than the grid's: that width is the base, and no rule is needed.
    assert config({n: 8 for n in uniform}, skipped) == {**want, "bits": 8}


def test_each_rule_matches_exactly_its_modules():
    layers = 12  # layer 1's rules must not catch layer 11
    bits = {n: 4 for n in names(layers)}
    bits.update({f"model.layers.1.{n}": 8 for n in FUSED["self_attn.qkv_proj"]})  # tied: one rule with qkv_proj
    bits.update({f"model.layers.11.{n}": 2 for n in FUSED["mlp.gate_up_proj"]})  # tied: one rule with gate_up_proj
    bits.update({"model.layers.3.self_attn.q_proj": 2, "model.layers.3.self_attn.k_proj": 8})  # not tied: one rule each
    bits["model.layers.1.mlp.down_proj"] = 3
    dynamic = config(bits)["dynamic"]
    want = {
        "model.layers.1.self_attn": {"q_proj", "k_proj", "v_proj", "qkv_proj"},
        "model.layers.11.mlp": {"gate_proj", "up_proj", "gate_up_proj"},
        "model.layers.3.self_attn.q_proj": None, "model.layers.3.self_attn.k_proj": None, "model.layers.1.mlp.down_proj": None,
    }
    intended = [{f"{k}.{leaf}" for leaf in v} if v else {k} for k, v in want.items()]
    assert len(dynamic) == len(intended)
    for key in dynamic:
        assert key.startswith("+:")
        matched = {n for n in candidates(layers) if re.match(key[2:], n)}
        assert matched in intended, (key, matched)
        intended.remove(matched)


def test_per_module_bits_round_trip_through_the_rules():
    rng = random.Random(0)
    for trial in range(20):
        all_names = names(6)
        skipped = rng.sample(all_names, 3)
        bits = {n: rng.choice([2, 3, 4, 8]) for n in all_names if n not in skipped}
        if trial % 2:  # tie the fused groups, as the allocator does by default
            for i in range(6):
                for members in FUSED.values():
                    width = rng.choice([2, 3, 4, 8])
                    bits.update({f"model.layers.{i}.{m}": width for m in members if f"model.layers.{i}.{m}" in bits})
        declared = json.loads(json.dumps(config(bits, skipped)))  # as a loader reads it from config.json
        assert {n: gptq_v1.declared_bits(declared, n) for n in all_names} == {**bits, **{n: None for n in skipped}}
        for i in range(6):
            for fused, members in FUSED.items():
                widths = {bits.get(f"model.layers.{i}.{m}") for m in members}
                if len(widths) == 1 and None not in widths:  # vLLM builds the fused layer at its members' width
                    assert gptq_v1.declared_bits(declared, f"model.layers.{i}.{fused}") == widths.pop()


def test_tied_fused_groups_take_one_rule_each():
    bits = {n: 4 for n in names(4)}
    for i in range(4):
        for m in LINEARS[:3]:
            bits[f"model.layers.{i}.{m}"] = 8
        for m in LINEARS[4:6]:
            bits[f"model.layers.{i}.{m}"] = 2
    weights = {n: 10 if n.endswith(("o_proj", "down_proj")) else 1 for n in bits}  # 4 bits hold the most weights
    # 4 layers x (qkv rule + gate_up rule); o_proj and down_proj are at the base width.
    assert len(config(bits, weights_by_module=weights)["dynamic"]) == 8


def test_base_is_the_width_holding_most_weights():
    # Five small attention linears at 4 bits, two big MLP linears at 2 bits.
    bits = {"a.q_proj": 4, "a.k_proj": 4, "a.v_proj": 4, "a.o_proj": 4, "a.x_proj": 4, "m.gate_proj": 2, "m.up_proj": 2}
    weights = {n: 64 * 64 if n.startswith("a.") else 64 * 512 for n in bits}
    assert config(bits, weights_by_module=weights)["bits"] == 2
    assert config(bits)["bits"] == 4  # without sizes each module counts once
    assert gptq_v1.base_bits({"x": 2, "y": 8}) == 2  # a tie goes to the lower width


def test_bad_bits_and_overlaps_are_refused():
    with pytest.raises(CompressorError, match=r"bits_by_module holds \[5\]"):
        config({"model.layers.0.mlp.down_proj": 5})
    with pytest.raises(CompressorError, match="both quantised .* and skipped"):
        config({"model.layers.0.mlp.down_proj": 4}, skipped=["model.layers.0.mlp.down_proj"])
    specs = {"a": compressor.modules.ModuleSpec("quant", 64, 64, False, bits=4, group_size=32),
             "b": compressor.modules.ModuleSpec("quant", 64, 64, False, bits=2, group_size=64)}
    with pytest.raises(CompressorError, match="group sizes \\[32, 64\\]"):
        gptq_v1.mixed_bits(specs)
    with pytest.raises(CompressorError, match="c is not a plain quantised linear"):
        gptq_v1.mixed_bits({"c": compressor.modules.ModuleSpec("lowrank", 64, 64, False, rank=8)})


# ----------------------------------------------------------------------------- a mixed-bit checkpoint

WIDTHS = {  # tiny llama: 64 wide, 96-wide MLP, k/v 32 wide: every width packs
    "model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.k_proj": 8, "model.layers.0.self_attn.v_proj": 8,
    "model.layers.0.self_attn.o_proj": 2, "model.layers.0.mlp.gate_proj": 4, "model.layers.0.mlp.up_proj": 4,
    "model.layers.0.mlp.down_proj": 3,
    "model.layers.1.self_attn.q_proj": 2, "model.layers.1.self_attn.k_proj": 4, "model.layers.1.self_attn.v_proj": 8,
    "model.layers.1.self_attn.o_proj": 4, "model.layers.1.mlp.gate_proj": 2, "model.layers.1.mlp.up_proj": 2,
}  # model.layers.1.mlp.down_proj stays float


def spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(n, generator=gen, dtype=torch.float64))
    return X.T @ X / X.shape[0]


def safetensors_payload(folder) -> tuple[int, int]:
    """(bytes of tensor data, sum of the tensors' own bytes) over the folder's safetensors files:
    each file is an 8-byte little-endian header length, that many JSON bytes, then the data."""
    data = tensors = 0
    for path in sorted(folder.rglob("*.safetensors")):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        data += len(raw) - 8 - n
        with safe_open(str(path), "pt") as f:
            tensors += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    return data, tensors


def test_mixed_bit_checkpoint_reloads_and_declares_each_width(tmp_path):
    model = tiny_model("llama")
    specs = {}
    for i, full in enumerate(WIDTHS):
        layer, _, name = full.partition(".layers.")[2].partition(".")
        module = models.decoder_layers(model)[int(layer)].get_submodule(name)
        new, spec = Gptq(GptqConfig(bits=WIDTHS[full], group_size=32)).quantize_module(module, spd(module.in_features, i), None)
        models.replace_linear(models.decoder_layers(model)[int(layer)], name, new)
        specs[full] = spec
    skipped = [n for n, _, _ in models.iter_linears_any(model) if n not in specs]
    assert skipped == ["model.layers.1.mlp.down_proj"]
    qcfg = gptq_v1.quantization_config(GRID, 0.01, False, "gptq", skipped, compressor.__version__, **gptq_v1.mixed_bits(specs))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    out = checkpoint.save(model, byte_tokenizer(), tmp_path / "out", specs, {}, {}, extra={"quantization_config": qcfg})

    loaded = compressor.load(out)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    assert {n: m.bits for n, _, m in models.iter_linears_any(loaded) if n in WIDTHS} == WIDTHS

    declared = json.loads((out / "config.json").read_text())["quantization_config"]
    assert declared == json.loads((out / "quantize_config.json").read_text())
    assert {n: gptq_v1.declared_bits(declared, n) for n, _, _ in models.iter_linears_any(model)} == {**WIDTHS, skipped[0]: None}
    assert gptq_v1.declared_bits(declared, "model.layers.0.self_attn.qkv_proj") == 8  # vLLM's fused layer, tied members
    assert gptq_v1.declared_bits(declared, "model.layers.1.mlp.gate_up_proj") == 2
    # 2 bits hold the most weights (o_proj 0, q_proj 1, gate/up 1); the rules: qkv 0, gate/up 0, down 0, k 1, v 1, o 1.
    assert declared["bits"] == 2 and len(declared["dynamic"]) == 1 + 6

    # Size accounting may read the folder: its weight bytes are the tensors' bytes plus the headers.
    data, tensors = safetensors_payload(out)
    assert data == tensors
    headers = sum(8 + struct.unpack("<Q", p.read_bytes()[:8])[0] for p in out.rglob("*.safetensors"))
    assert accounting.weight_bytes(out) - headers == tensors
    state = {t.data_ptr(): t for t in model.state_dict().values()}
    assert tensors == sum(t.numel() * t.element_size() for t in state.values())

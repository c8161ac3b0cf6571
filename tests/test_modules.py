"""The runtime shipped in every checkpoint (compressor/modules.py): the typed module spec and the
compressed-linear interface that export, accounting and adapters use."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from compressor import modules
from compressor.api import compress
from compressor.errors import CompressorError
from compressor.export import checkpoint
from compressor.modules import LoraAdapted, LowRankLinear, LowRankSparseLinear, ModuleSpec, QuantLinear, build_module

SPECS = [
    ModuleSpec("dense", 48, 64, False),
    ModuleSpec("quant", 32, 64, True, bits=4, group_size=32),
    ModuleSpec("lowrank", 32, 64, True, rank=8),
    ModuleSpec("lowrank_sparse", 32, 64, False, rank=8, cols=3),
    ModuleSpec("lowrank", 32, 64, False, rank=8, quant={"bits": 8, "group_size": -1}),
    ModuleSpec("quant", 32, 64, False, bits=3, group_size=32, adapter={"rank": 8, "bits": 4, "group_size": 32}),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.type)
def test_spec_round_trips_through_json_and_builds_its_module(spec):
    text = json.dumps(spec.to_json())
    back = ModuleSpec.from_json("x", json.loads(text))
    assert back == spec
    module = build_module(spec, torch.nn.Linear(64, 32))
    assert (module.in_features, module.out_features) == (spec.inp, spec.out)
    assert isinstance(module, LoraAdapted) == (spec.adapter is not None)


@pytest.mark.parametrize("bad,why", [
    ({"type": "lowrank", "out": 4, "in": 4, "bias": False, "rank": -1}, r"rank must be an integer in \[1, 1048576\]"),
    ({"type": "lowrank", "out": 4, "in": 4, "bias": False, "rank": "8"}, r"rank must be an integer in \[1, 1048576\]"),
    ({"type": "lowrank", "out": 4, "in": 4, "bias": False, "rank": True}, r"rank must be an integer in \[1, 1048576\]"),
    ({"type": "lowrank", "out": 4, "in": 4, "bias": False, "rank": 10**9}, r"rank must be an integer in \[1, 1048576\], got 1000000000"),
    ({"type": "conv", "out": 4, "in": 4, "bias": False}, "type must be one of"),
    ({"type": "quant", "out": 8, "in": 8, "bias": False, "bits": 7, "group_size": 8}, "bits must be one of"),
    ({"type": "quant", "out": 8, "in": 8, "bias": False, "bits": 4, "group_size": 0}, "group_size must be -1 or a positive integer"),
    ({"type": "dense", "out": 4, "in": 4, "bias": False, "rank": 2}, "a dense module has no 'rank'"),
    ({"type": "dense", "out": 4, "in": 4, "bias": "no"}, "bias must be true or false"),
    ({"type": "dense", "out": 4, "in": 4, "bias": False, "colour": 1}, "unknown field 'colour'"),
    (["dense"], "must be a mapping"),
])
def test_a_malformed_spec_is_refused_naming_the_module_and_field(bad, why):
    with pytest.raises(ValueError, match=why) as caught:
        ModuleSpec.from_json("model.layers.0.mlp.up_proj", bad)
    assert "model.layers.0.mlp.up_proj" in str(caught.value)
    with pytest.raises(ValueError, match="must be a mapping"):
        modules.specs_from_json([bad])


def test_load_of_an_edited_compression_section_is_a_toolkit_error(tmp_path):
    out = tmp_path / "out"
    compress(tiny_model("llama"), "svd", out, device="cpu")
    config = json.loads((out / "config.json").read_text())
    name = next(iter(config["compression"]["modules"]))
    for edit in ({"rank": -3}, {"rank": "big"}, {"type": "mystery"}):
        broken = json.loads(json.dumps(config))
        broken["compression"]["modules"][name].update(edit)
        (out / "config.json").write_text(json.dumps(broken))
        with pytest.raises(CompressorError, match="compression section was edited or damaged"):
            checkpoint.load(out)
    broken = json.loads(json.dumps(config))
    broken["compression"]["modules"] = list(broken["compression"]["modules"])
    (out / "config.json").write_text(json.dumps(broken))
    with pytest.raises(CompressorError, match="compression.modules must be a mapping"):
        checkpoint.load(out)


def _filled(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


def _quant(in_f, out_f, bits=4, seed=1) -> QuantLinear:
    q = QuantLinear(in_f, out_f, bits, 32)
    gen = torch.Generator().manual_seed(seed)
    q.qweight.copy_(torch.randint(-2**31, 2**31 - 1, q.qweight.shape, generator=gen, dtype=torch.int64).to(torch.int32))
    q.scales.copy_((torch.rand(q.scales.shape, generator=gen) * 0.01 + 0.001).half())
    return q


def _cases():
    sparse = _filled(LowRankSparseLinear(64, 32, 6, 3, bias=True))
    sparse.sparse_cols.copy_(torch.tensor([1, 17, 40]))
    quant_lowrank = LowRankLinear(64, 32, 8)
    quant_lowrank.down, quant_lowrank.up = _quant(64, 8, seed=2), _quant(8, 32, seed=3)
    return {
        "lowrank": _filled(LowRankLinear(64, 32, 6, bias=True)),
        "lowrank_sparse": sparse,
        "quant": _quant(64, 32),
        "quant_lowrank": quant_lowrank,
        "adapted": LoraAdapted.from_factors(_quant(64, 32), torch.randn(32, 4) * 0.1, torch.randn(4, 64) * 0.1),
        "plain": _filled(torch.nn.Linear(64, 32)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_effective_weight_is_what_the_module_computes(name):
    module = _cases()[name]
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(5))
    bias = getattr(module, "bias", None)
    if isinstance(module, LowRankLinear):
        bias = module.up.bias
    expected = (x.double() @ modules.effective_weight(module).double().T).float()
    if bias is not None:
        expected = expected + bias.detach().float()
    assert torch.allclose(module(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(_cases()))
def test_stored_bits_counts_what_the_checkpoint_holds(name):
    module = _cases()[name]
    state = module.state_dict()
    if isinstance(module, LoraAdapted) and not isinstance(module.lora_A, QuantLinear):
        state = {k: v for k, v in state.items() if not k.startswith("lora_")}
    assert modules.stored_bits(module) == sum(t.numel() * t.element_size() * 8 for t in state.values())


def test_streamed_resume_journal_restores_typed_specs(tmp_path):
    """The journal stores specs as JSON and a resumed run reads them back as ModuleSpecs."""
    from compressor.pipeline.sinks import _write_json_atomic

    path = tmp_path / "p.json"
    _write_json_atomic({"specs": {"a": SPECS[2]}}, path)
    assert modules.specs_from_json(json.loads(path.read_text())["specs"]) == {"a": SPECS[2]}
    with pytest.raises(TypeError):
        _write_json_atomic({"x": object()}, tmp_path / "q.json")

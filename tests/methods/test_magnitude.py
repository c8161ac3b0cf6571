"""compressor/methods/magnitude.py: data-free structured MLP widths by weight magnitude."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from compressor import models, recipe
from compressor.api import compress
from compressor.errors import CompressorError
from compressor.methods.magnitude import channel_scores

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _recipe(**options) -> recipe.Recipe:
    return recipe.from_dict({"stages": [{"method": "magnitude", **options}]}, source="magnitude-test")


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_scores_are_the_product_of_row_and_column_norms():
    gen = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(12, 8, generator=gen), torch.randn(12, 8, generator=gen), torch.randn(8, 12, generator=gen)
    want = [gate[j].double().norm() * up[j].double().norm() * down[:, j].double().norm() for j in range(12)]
    assert torch.allclose(channel_scores([gate, up], down), torch.stack(want), rtol=1e-12, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_standard_export_reloads_without_remote_code(arch, tmp_path):
    out = tmp_path / "out"
    result = compress(tiny_model(arch), _recipe(ratio=0.2), out, device="cpu")
    width = result.report["magnitude"]["width"]
    assert width % 32 == 0 and width < result.report["magnitude"]["intermediate_size_before"]
    assert result.report["calibration"] is None  # data-free
    assert 0.1 < result.report["achieved_linear_ratio"] < 0.3
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["compression"]["modules"] == {}
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert (_logits(plain) - _logits(result.model)).abs().max() <= 1e-4
    mlp = models.arch_for(plain).mlp
    for layer in models.decoder_layers(plain):
        assert models.weight_of(layer.get_submodule(mlp.output)).shape[1] == width


def test_keeps_the_highest_scoring_channels_unchanged():
    model = tiny_model("llama")
    dense = [(layer.mlp.gate_proj.weight.clone(), layer.mlp.up_proj.weight.clone(), layer.mlp.down_proj.weight.clone()) for layer in model.model.layers]
    result = compress(model, _recipe(ratio=0.2), device="cpu")
    width = result.report["magnitude"]["width"]
    for (gate, up, down), layer in zip(dense, result.model.model.layers):
        kept = channel_scores([gate, up], down).topk(width).indices.sort().values
        assert torch.equal(layer.mlp.gate_proj.weight, gate[kept]) and torch.equal(layer.mlp.up_proj.weight, up[kept])
        assert torch.equal(layer.mlp.down_proj.weight, down[:, kept])


def test_full_width_leaves_the_model_unchanged():
    model = tiny_model("llama")
    before = _logits(model)
    result = compress(model, _recipe(ratio=1e-9, multiple_of=1), device="cpu")
    assert result.report["magnitude"]["width"] == 96
    assert torch.equal(_logits(result.model), before)


def test_composes_with_gptq_on_the_narrower_layers(tmp_path):
    rec = recipe.from_dict({"stages": [{"method": "magnitude", "ratio": 0.2}, {"method": "gptq", "bits": 4, "group_size": 32}]})
    result = compress(tiny_model("llama"), rec, tmp_path / "out", tokenizer=byte_tokenizer(), samples=4, seq_len=32, device="cpu")
    width = result.report["magnitude"]["width"]
    specs = json.loads((tmp_path / "out" / "config.json").read_text())["compression"]["modules"]
    assert specs["model.layers.0.mlp.down_proj"] == {"type": "quant", "out": 64, "in": width, "bias": False, "bits": 4, "group_size": 32}


@pytest.mark.parametrize("options, message", [
    ({"ratio": 0}, "key 'ratio' must be a number in"),
    ({"multiple_of": 0}, "key 'multiple_of' must be an integer >= 1"),
    ({"targets": ["self_attn.*"]}, "only the MLP width is reduced"),
])
def test_bad_options_fail_at_recipe_load(options, message):
    with pytest.raises(CompressorError, match=message):
        _recipe(**options)


def test_refuses_a_rank_stage_beside_it():
    with pytest.raises(CompressorError, match="changes the layer shapes a rank stage plans on"):
        recipe.from_dict({"stages": [{"method": "magnitude"}, {"method": "svd"}]})

"""benchmarks/structured_speed.py builds the models it times with the shapes it claims."""

import torch
from conftest import load_benchmark, tiny_model

from compressor import models, recipe
from compressor.api import compress

bench = load_benchmark("structured_speed")


def test_narrowed_model_has_structureds_uniform_width():
    model = tiny_model("llama")
    small, k = bench.narrowed(model, 0.2)
    real = compress(tiny_model("llama"), recipe.from_dict({"stages": [{"method": "magnitude", "ratio": 0.2}]}), device="cpu")
    assert k == real.report["magnitude"]["width"] == small.config.intermediate_size  # the same width rule as structured's
    assert models.count_params(small) == models.count_params(real.model)
    for layer in models.decoder_layers(small):
        assert layer.mlp.down_proj.weight.shape[1] == k and layer.mlp.gate_proj.weight.shape[0] == k
    with torch.no_grad():
        assert torch.isfinite(small(torch.zeros(1, 8, dtype=torch.long)).logits).all()


def test_speed_reports_medians_of_its_runs():
    res = bench.speed(tiny_model("llama"), prefill_len=16, decode_tokens=4, repeats=3)
    assert len(res["prefill_runs"]) == 3 and res["prefill_tok_s"] in res["prefill_runs"]
    assert res["decode_tok_s"] > 0

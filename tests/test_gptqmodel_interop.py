"""Opt-in: gptqmodel (through transformers) loads our GPTQ v1 export and computes our logits.

gptqmodel needs torch >= 2.14.1, so it lives in its own environment; point the test at its Python:

    COMPRESSOR_GPTQMODEL_PYTHON=~/gq/bin/python python -m pytest tests/test_gptqmodel_interop.py

benchmarks/gptqmodel_check.py runs the same check on the real demo model.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import compressor
from compressor import models, recipe
from compressor.api import compress
from compressor.export import checkpoint
from compressor.methods.gptq import Gptq, GptqConfig
from compressor.methods.gptq import format as gptq_v1

PYTHON = os.environ.get("COMPRESSOR_GPTQMODEL_PYTHON")
LOADER = Path(__file__).resolve().parents[1] / "benchmarks" / "gptqmodel_load.py"


def wide_llama():
    torch.manual_seed(0)
    # gptqmodel's kernels want in/out features that are multiples of 32 or more: wider than conftest's.
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.skipif(not PYTHON, reason="set COMPRESSOR_GPTQMODEL_PYTHON to a Python with gptqmodel, optimum and peft")
@pytest.mark.parametrize("act_order", [False, True])
def test_gptqmodel_loads_our_export(act_order, tmp_path):
    model = wide_llama()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
    stages = [{"method": "gptq", "bits": 4, "group_size": 128, "act_order": act_order}, {"method": "eora", "rank": 8, "sequential": False}]
    out = tmp_path / "out"
    result = compress(model, recipe.from_dict({"stages": stages}), out, tokenizer=byte_tokenizer(), samples=8, seq_len=64, device="cpu")
    with torch.no_grad():
        reference = {"ids": ids, "logits": compressor.load(out, adapter=False)(ids).logits, "adapted": result.model(ids).logits}
    save_file(reference, str(tmp_path / "reference.safetensors"))

    run = subprocess.run([PYTHON, str(LOADER), str(out), str(tmp_path / "reference.safetensors")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["row"]: r for r in (json.loads(line) for line in run.stdout.splitlines() if line.startswith("{"))}
    assert set(rows) == {"base", "base + PEFT adapter"}
    quant_err = (reference["logits"] - dense).abs().max().item()
    for row in rows.values():
        assert row["kernels"], "no gptqmodel layer was built"
        # gptqmodel dequantises in float16: equal to that rounding, far below the quantisation error.
        assert row["max_abs_diff"] <= 0.05 * quant_err, (row, quant_err)
        assert row["argmax_agreement"] >= 0.95, row


# Every width, tied and untied fused groups, one linear left float (model.layers.1.mlp.down_proj).
WIDTHS = {
    "model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.k_proj": 8, "model.layers.0.self_attn.v_proj": 8,
    "model.layers.0.self_attn.o_proj": 2, "model.layers.0.mlp.gate_proj": 4, "model.layers.0.mlp.up_proj": 4,
    "model.layers.0.mlp.down_proj": 3,
    "model.layers.1.self_attn.q_proj": 2, "model.layers.1.self_attn.k_proj": 4, "model.layers.1.self_attn.v_proj": 8,
    "model.layers.1.self_attn.o_proj": 4, "model.layers.1.mlp.gate_proj": 2, "model.layers.1.mlp.up_proj": 2,
}


@pytest.mark.skipif(not PYTHON, reason="set COMPRESSOR_GPTQMODEL_PYTHON to a Python with gptqmodel, optimum and peft")
def test_gptqmodel_reads_per_module_bits(tmp_path):
    """GPTQModel.load builds each linear at the width the `dynamic` rules give it (docs/guides/mixed-bits.md)."""
    model = wide_llama()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
    specs = {}
    for i, (full, bits) in enumerate(WIDTHS.items()):
        layer, _, name = full.partition(".layers.")[2].partition(".")
        block = models.decoder_layers(model)[int(layer)]
        X = torch.randn(1024, block.get_submodule(name).in_features, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        new, specs[full] = Gptq(GptqConfig(bits=bits, group_size=128)).quantize_module(block.get_submodule(name), X.T @ X / len(X), None)
        models.replace_linear(block, name, new)
    skipped = [n for n, _, _ in models.iter_linears_any(model) if n not in specs]
    grid = {"bits": 4, "group_size": 128, "sym": True, "desc_act": False}
    qcfg = gptq_v1.quantization_config(grid, 0.01, False, "gptq", skipped, compressor.__version__, **gptq_v1.mixed_bits(specs))
    out = checkpoint.save(model, byte_tokenizer(), tmp_path / "out", specs, {}, {}, extra={"quantization_config": qcfg})
    with torch.no_grad():
        reference = {"ids": ids, "logits": compressor.load(out)(ids).logits}
    save_file(reference, str(tmp_path / "reference.safetensors"))

    run = subprocess.run([PYTHON, str(LOADER), str(out), str(tmp_path / "reference.safetensors"), "--gptqmodel"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert row["bits"] == WIDTHS  # every width honoured, the skipped linear left float
    quant_err = (reference["logits"] - dense).abs().max().item()
    # float16 kernels: equal to that rounding, far below the quantisation error.
    assert row["max_abs_diff"] <= 0.05 * quant_err, (row, quant_err)
    assert row["argmax_agreement"] >= 0.95, row

"""An option's price: its bytes are what the export stores, its error what the adapter leaves."""

import pytest
import torch

from compressor.methods.allocate.options import Option, errors_by_rank, gram_root, option_bytes, packable, quant_bytes, spectrum_energies
from compressor.methods.eora import fit as eora
from compressor.methods.gptq import Gptq, GptqConfig
from compressor.modules import LoraAdapted, stored_bits

from ..helpers import correlated_inputs, gram


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group", [((96, 64), 32), ((64, 128), 128), ((32, 96), -1), ((128, 64), 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_option_bytes_equal_what_the_modules_store(bits, shape, group, bias):
    out_f, in_f = shape
    linear = torch.nn.Linear(in_f, out_f, bias=bias)
    X = correlated_inputs(in_f, tokens=512).float()
    quantised, _ = Gptq(GptqConfig(bits=bits, group_size=group)).quantize_module(linear, gram(X.double()), None)
    quantised = quantised.to(torch.bfloat16)  # the bias is written in the output dtype; scales stay float16
    assert quant_bytes(out_f, in_f, bits, group) == sum(t.numel() * t.element_size() for n, t in quantised.named_buffers() if n != "bias")
    assert option_bytes(out_f, in_f, Option(bits, 0), group, 2, bias) == stored_bits(quantised) // 8
    rank = 8
    adapted = LoraAdapted.from_factors(quantised, torch.zeros(out_f, rank), torch.zeros(rank, in_f), dtype=torch.bfloat16)
    adapter = sum(p.numel() * p.element_size() for p in [adapted.lora_A.weight, adapted.lora_B.weight])
    assert option_bytes(out_f, in_f, Option(bits, rank), group, 2, bias) == stored_bits(quantised) // 8 + adapter


def test_three_bits_need_multiples_of_32():
    assert packable(3, 64, 96) and not packable(3, 48, 64) and packable(4, 48, 64)


@pytest.mark.parametrize("weighted", [False, True])
def test_error_by_rank_is_the_output_error_the_fitted_adapter_leaves(weighted):
    torch.manual_seed(0)
    out_f, in_f = 48, 64
    X = correlated_inputs(in_f, tokens=2048, seed=3)
    H = gram(X)
    W = torch.randn(out_f, in_f, dtype=torch.float64) / 8
    Q = torch.round(W * 4) / 4  # a quantised-looking weight: the price is about the error, not the grid
    dW = W - Q
    d = torch.rand(out_f, dtype=torch.float64) + 0.1 if weighted else None
    row = d.sqrt() if weighted else None
    energies, total = spectrum_energies(dW, H, gram_root(H), row)
    ranks = [0, 4, 8, 16]
    errors = errors_by_rank(energies, ranks, total)
    target = dW if row is None else row[:, None] * dW
    for r, err in zip(ranks, errors):
        if r == 0:
            left = target
        else:
            B, A, _ = eora.eora_fit(target, H, r)
            left = target - B.double() @ A.double()
        # the float64 reference: the weighted squared output error per token on the data itself
        direct = float((left @ X.T).square().sum()) / X.shape[0]
        assert err == pytest.approx(direct, rel=1e-9)
    assert errors == sorted(errors, reverse=True)


def test_ranks_beyond_the_spectrum_remove_everything():
    energies = torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64)
    assert errors_by_rank(energies, [0, 1, 3, 64]) == [5.5, 1.5, 0.0, 0.0]

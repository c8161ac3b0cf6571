"""Why `welore30-gptq4-eora` landed elsewhere on CUDA (issue 28), reproduced on the CPU.

tests/test_gpu.py asks a CUDA run to land within 0.1x the compression error of the CPU run. An SVD
component is defined only up to its sign, and LAPACK and cuSOLVER choose differently; the product
up @ down does not care, but GPTQ rounds `up`'s rows, and a flipped column changes their range and
so their codes. Here the flip is injected into LAPACK's output on the CPU: without a canonical sign
the run moves ~0.6x the compression error (what the H200 showed: 0.0021 against 0.0027), with it not
at all. Float32-level noise on the weights, the other difference between devices, moves it less
than half of test_gpu.py's 0.1: that tolerance is right, and stays.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_api import IDS, shipped

from compressor import linalg
from compressor.api import compress

CALIB = dict(samples=4, seq_len=32, device="cpu")
TOLERANCE = 0.1  # tests/test_gpu.py: |GPU - CPU| <= 0.1 x |CPU - dense| (mean absolute logits)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.double()


def _run(tokenizer, model=None):
    model = tiny_model("llama") if model is None else model
    return _logits(compress(model, shipped("welore30-gptq4-eora", rank=4), tokenizer=tokenizer, **CALIB).model)


@pytest.fixture(scope="module")
def reference(tokenizer):
    torch.set_num_threads(1)  # as the fingerprints: thread splits round differently
    return _logits(tiny_model("llama")), _run(tokenizer)


def _flip_lapack_signs(monkeypatch):
    """LAPACK's SVD with a fixed, random half of its components negated: an equally valid SVD, as
    another library may return it."""
    original = linalg._lapack

    def flipped(fn, x, **kwargs):
        out = original(fn, x, **kwargs)
        if fn is not torch.linalg.svd:
            return out
        u, s, vh = out
        sign = (torch.randint(0, 2, s.shape, generator=torch.Generator().manual_seed(7)) * 2 - 1).to(u.dtype)
        return u * sign[..., None, :], s, vh * sign[..., :, None]

    monkeypatch.setattr(linalg, "_lapack", flipped)


def test_another_libraries_svd_signs_give_the_same_model(reference, tokenizer, monkeypatch):
    _, on_cpu = reference
    _flip_lapack_signs(monkeypatch)
    assert torch.equal(_run(tokenizer), on_cpu)


def test_the_gpu_tolerance_catches_sign_choices_but_not_float32_rounding(reference, tokenizer, monkeypatch):
    dense, on_cpu = reference
    error = (on_cpu - dense).abs().mean()
    # float32 rounding of every weight (what a device's arithmetic may change): well inside
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name:
                p.mul_(1 + 6e-8 * torch.randn(p.shape, generator=gen))
    assert (_run(tokenizer, model) - on_cpu).abs().mean() <= 0.5 * TOLERANCE * error
    # the same flipped signs without the canonical choice: what failed on CUDA fails here too
    _flip_lapack_signs(monkeypatch)
    monkeypatch.setattr(linalg, "canonical_signs", lambda u, s, vh: (u, s, vh))
    assert (_run(tokenizer) - on_cpu).abs().mean() > TOLERANCE * error

"""Gram accuracy: the chunked float32 path (CUDA's default) against the float64 reference.

The metric is what whitening sees: the error E of H measured in the metric of the damped H that
whiten uses, ||S^-1 E S^-T||_2 with S S^T = H + 1e-3 mean(diag H) I. TOLERANCE = 3e-4 keeps it
under a third of what that damping itself changes. Inputs with a large mean (a few LLM channels
carry activations far above the rest) are the hard case: float32 then loses the small directions
under the mean's square.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor import linalg
from compressor.calibration.collect import GramCollector, chunked_gram, to_tf32

TOLERANCE = 3e-4
DAMP = 1e-3


def _tokens(mean: float, n: int = 1 << 16, d: int = 32) -> torch.Tensor:
    return mean + torch.randn(n, d, generator=torch.Generator().manual_seed(0))


def _error(sum_xtx: torch.Tensor, x: torch.Tensor) -> float:
    ref = x.double().T @ x.double()
    n = x.shape[0]
    h = ref / n
    h = h + DAMP * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    low = torch.linalg.cholesky(h)
    e = (sum_xtx.double() - ref) / n
    m = torch.linalg.solve_triangular(low, torch.linalg.solve_triangular(low, e, upper=False).T, upper=False)
    return float(torch.linalg.matrix_norm(m, ord=2))


def _running_float32(x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """What `calibration.gram_dtype: float32` does: one float32 sum over every batch."""
    layer = nn.Linear(x.shape[1], 4, bias=False)
    collector = GramCollector({"a": layer}, {"a": "x"}, dtype=torch.float32)
    with torch.no_grad():
        for part in x.split(batch):
            layer(part)
    collector.close()
    return collector.sums["x"]


@pytest.mark.parametrize("mean", [0.0, 30.0])
def test_chunked_gram_is_within_tolerance_of_float64(mean):
    x = _tokens(mean)
    assert _error(chunked_gram(x), x) <= TOLERANCE


def test_the_tolerance_rejects_float32_sums_and_bfloat16_products():
    """The tolerance matters: on inputs with a large mean, a float32 running sum (its error grows
    with the token count) and products of bfloat16-rounded inputs (a bf16 GEMM) both fail it."""
    x = _tokens(30.0)
    assert _error(_running_float32(x), x) > TOLERANCE
    bf16 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for part in x.split(512):
        b = part.bfloat16().float()
        bf16 += (b.T @ b).double()
    assert _error(bf16, x) > TOLERANCE


def test_collector_chunked_path_matches_the_float64_one():
    torch.manual_seed(0)
    q, k = nn.Linear(16, 8), nn.Linear(16, 4)
    up = nn.Linear(16, 24)
    groups = {"q": "attn", "k": "attn", "up": "mlp"}
    linears = {"q": q, "k": k, "up": up}
    exact, fast = GramCollector(linears, groups), GramCollector(linears, groups, chunked=True)
    with torch.no_grad():
        for _ in range(3):
            x = 5 + torch.randn(2, 700, 16)  # 1400 tokens: several chunks per batch
            q(x), k(x), up(x)
    exact.close(), fast.close()
    a, b = exact.grams(), fast.grams()
    assert a.keys() == b.keys() == {"attn", "mlp"}
    for g in a:
        assert b[g].dtype == torch.float64
        assert torch.allclose(b[g], a[g], rtol=0, atol=1e-6 * float(a[g].abs().max()))
    assert fast.counts == exact.counts == {"attn": 4200, "mlp": 4200}


def test_to_tf32_keeps_ten_mantissa_bits_rounded_to_nearest():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(1)) * 1e3
    t = to_tf32(x)
    assert (t.view(torch.int32) & 0x1FFF == 0).all()
    assert ((t - x).abs() <= x.abs() * 2.0**-11).all()
    assert ((x - t).abs() < (to_tf32(x) - x).abs() + 1).all()
    assert torch.equal(to_tf32(t), t)


def test_whitening_factorises_a_shared_gram_once(monkeypatch):
    h1 = torch.eye(8, dtype=torch.float64) * 2
    h2 = torch.diag(torch.arange(1, 9, dtype=torch.float64))
    calls = []
    original = linalg.eigh
    monkeypatch.setattr(linalg, "eigh", lambda mats, dtype=torch.float64: calls.append(len(mats)) or original(mats, dtype))
    got = linalg.whitening([h1, h1, h1, h2, h2])  # q, k, v read one input; gate, up another
    assert calls == [2]
    assert got[0] is got[1] is got[2] and got[3] is got[4]
    s, s_inv = got[3]
    assert torch.allclose(s @ s.T, h2 + 1e-3 * h2.diagonal().mean() * torch.eye(8, dtype=torch.float64))

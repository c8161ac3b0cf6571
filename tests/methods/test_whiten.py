import pytest
import torch

from compressor.methods.base import RankConfig
from compressor.methods.svd import SVD
from compressor.methods.whiten import Whiten, WhitenConfig

from .helpers import correlated_inputs, gram, output_error


def _product(f):
    return f["up.weight"].double() @ f["down.weight"].double()


@pytest.mark.parametrize("rank", [4, 16, 32])
def test_whitened_beats_plain_svd_on_output_error(rank):
    torch.manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64)
    x = correlated_inputs(64)
    h = gram(x)
    ours = Whiten(WhitenConfig(damp=0.0)).decompose([w], [h], [rank])[0]
    plain = SVD(RankConfig()).decompose([w.float()], [None], [rank])[0]
    assert output_error(w, _product(ours), x) < output_error(w, _product(plain), x)


def test_matches_float64_closed_form():
    torch.manual_seed(1)
    w = torch.randn(40, 32, dtype=torch.float64)
    x = correlated_inputs(32, seed=3)
    h = gram(x)
    rank = 10
    ours = _product(Whiten(WhitenConfig(damp=0.0)).decompose([w], [h], [rank])[0])
    # Closed form (SVD-LLM): S = chol(H), W_k = [W S]_k S^-1; the optimum is the tail of sigma(W S).
    s = torch.linalg.cholesky(h)
    u, sig, vh = torch.linalg.svd(w @ s, full_matrices=False)
    ref = (u[:, :rank] * sig[:rank]) @ vh[:rank] @ torch.linalg.inv(s)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-8)
    best = float(sig[rank:].square().sum().sqrt()) * x.shape[0] ** 0.5
    assert output_error(w, ours, x) == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("kind", ["zeros", "rank_deficient", "one_channel_dead"])
def test_singular_grams_give_finite_factors(kind):
    torch.manual_seed(2)
    w = torch.randn(24, 32, dtype=torch.float64)
    if kind == "zeros":
        h = torch.zeros(32, 32, dtype=torch.float64)
    elif kind == "rank_deficient":
        h = gram(correlated_inputs(32, tokens=256, rank=5))
    else:
        x = correlated_inputs(32)
        x[:, 7] = 0
        h = gram(x)
    method = Whiten(WhitenConfig())
    f = method.decompose([w], [h], [8])[0]
    e = method.energies([w], [h])[0]
    assert torch.isfinite(f["up.weight"]).all() and torch.isfinite(f["down.weight"]).all()
    assert torch.isfinite(e).all() and (e >= 0).all()
    # On directions the data does reach, it must still approximate W's action.
    if kind == "rank_deficient":
        x = correlated_inputs(32, tokens=256, rank=5)
        assert output_error(w, _product(f), x) <= 1e-3 * float((w @ x.T).norm()) + 1e-9

import math

import pytest
import torch
from activations import correlated, gram

from compressor.eora import allocate_ranks, eora_adapters, eora_fit, removed_share, svd_adapters
from compressor.errors import CompressorError
from compressor.quant import QuantConfig, gptq_quantize


def rms_out_err(dW, B, A, X) -> float:
    """||(dW - B A) X^T||_F / sqrt(N)."""
    M = dW.double() - B.double() @ A.double()
    return (M @ X.double().T).norm().item() / math.sqrt(X.shape[0])


def optimal_err(dW, X, rank) -> float:
    """Closed form via an independent whitening (Cholesky instead of eigh): the optimal error is
    the root of the dropped squared singular values of dW C, where H = C C^T."""
    C = torch.linalg.cholesky(gram(X))
    s = torch.linalg.svdvals(dW.double() @ C)
    return s[rank:].square().sum().sqrt().item()


@pytest.fixture(scope="module")
def case():
    gen = torch.Generator().manual_seed(0)
    X = correlated(2048, 256)
    dW = torch.randn(128, 256, generator=gen) * 0.01
    return dW, X


@pytest.mark.parametrize("rank", [1, 8, 32])
def test_eora_is_optimal_and_beats_plain_svd(case, rank):
    dW, X = case
    B, A = eora_adapters(dW, gram(X), rank)
    assert B.shape == (128, rank) and A.shape == (rank, 256) and B.dtype == torch.float32
    err = rms_out_err(dW, B, A, X)
    assert err == pytest.approx(optimal_err(dW, X, rank), rel=1e-5)
    svd_err = rms_out_err(dW, *svd_adapters(dW, rank), X)
    assert err < svd_err and (rank < 8 or err < 0.96 * svd_err)


@pytest.mark.parametrize("rank", [1, 8, 32])
def test_removed_share_is_the_output_error_removed(case, rank):
    dW, X = case
    B, A, energies = eora_fit(dW, gram(X), 64)
    before = rms_out_err(dW, torch.zeros(128, 1), torch.zeros(1, 256), X)
    after = rms_out_err(dW, B[:, :rank], A[:rank], X)  # the top-r truncation is the rank-r optimum
    assert after == pytest.approx(optimal_err(dW, X, rank), rel=1e-5)
    assert removed_share(energies, rank) == pytest.approx(1 - after**2 / before**2, rel=1e-6)
    assert removed_share(eora_fit(torch.zeros(4, 256), gram(X), 2)[2], 2) == 0.0


def test_allocation_spends_the_budget_where_error_per_parameter_is_largest():
    energies = {"a": torch.tensor([9.0, 4.0, 1.0, 0.5]), "b": torch.tensor([3.0, 2.5, 2.0, 0.1]), "c": torch.tensor([100.0, 0.0, 0.0, 0.0])}
    costs = {"a": 10, "b": 10, "c": 20}
    ranks = {"a": 2, "b": 2, "c": 2}  # budget: 2 * (10 + 10 + 20) = 80 parameters per pool
    # one pool, error removed per parameter: c0 5.0, a0 0.9, a1 0.4, b0 0.3, b1 0.25, b2 0.2, a2 0.1:
    # exactly 80 parameters; c's worthless second component is left out.
    got = allocate_ranks(energies, costs, ranks, dict.fromkeys(energies, "all"), dict.fromkeys(energies, 4))
    assert got == {"a": 3, "b": 3, "c": 1}
    # pools keep their own budgets; the cap bounds every module.
    got = allocate_ranks(energies, costs, ranks, {"a": "x", "b": "x", "c": "y"}, dict.fromkeys(energies, 3))
    assert got["a"] + got["b"] == 4 and got["c"] == 2 and max(got.values()) <= 3


def test_full_rank_reconstructs(case):
    dW, X = case
    H = gram(X)
    B, A = eora_adapters(dW, H, 500, eps=0.0)  # rank clamped to min(out, in); keep every eigenvalue
    assert B.shape == (128, 128)
    assert torch.allclose(B.double() @ A.double(), dW.double(), atol=1e-5)
    # The default eps drops H's few near-null directions (eigenvalues < max * in * 1.2e-7); what
    # remains there is negligible on the data.
    B, A = eora_adapters(dW, H, 128)
    assert rms_out_err(dW, B, A, X) < 1e-3 * rms_out_err(dW, 0 * B, A, X)


def test_factors_are_balanced_in_whitened_space(case):
    dW, X = case
    B, A = eora_adapters(dW.double(), gram(X), 16)
    assert B.dtype == torch.float64
    C = torch.linalg.cholesky(gram(X))
    # A C has orthogonal rows with the same norms as B's columns (both sqrt of singular values).
    assert torch.allclose(B.norm(dim=0), (A @ C).norm(dim=1), rtol=1e-6)


def test_singular_gram_truncated_pseudo_inverse():
    gen = torch.Generator().manual_seed(1)
    X = correlated(96, 192, seed=2)  # rank <= 96 < 192
    X[:, :20] = 0  # dead channels
    dW = torch.randn(64, 192, generator=gen) * 0.01
    H = gram(X)
    B, A = eora_adapters(dW, H, 16)
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    assert A[:, :20].abs().max() < 1e-6 * A.abs().max()  # nothing is spent on inputs never seen
    # Optimal over the visited subspace: the SVD of dW restricted to X's row space.
    _, s, vh = torch.linalg.svd(X.double(), full_matrices=False)
    basis = vh[s > s[0] * 1e-9]
    ref = torch.linalg.svdvals(dW.double() @ basis.T @ torch.diag(s[s > s[0] * 1e-9]) / math.sqrt(96))
    assert rms_out_err(dW, B, A, X) == pytest.approx(ref[16:].square().sum().sqrt().item(), rel=1e-4)
    assert math.isfinite(rms_out_err(dW, *eora_adapters(dW, torch.zeros(192, 192, dtype=torch.float64), 4), X))


def test_compensates_gptq_error_more_with_rank():
    gen = torch.Generator().manual_seed(3)
    X = correlated(1024, 256, seed=4)
    H = gram(X)
    W = torch.randn(128, 256, generator=gen) * 0.05
    W_hat = gptq_quantize(W, H, QuantConfig(bits=3, group_size=64)).w_hat
    dW = W - W_hat
    errs = [rms_out_err(dW, *eora_adapters(dW, H, r), X) for r in (4, 16, 64)]
    base = rms_out_err(dW, torch.zeros(128, 1), torch.zeros(1, 256), X)
    assert base > errs[0] > errs[1] > errs[2]


def test_rejects_bad_rank(case):
    dW, X = case
    with pytest.raises(CompressorError, match="rank must be a positive integer"):
        eora_adapters(dW, gram(X), 0)
    with pytest.raises(CompressorError, match="input Gram has shape"):
        eora_adapters(dW, torch.eye(10, dtype=torch.float64), 4)

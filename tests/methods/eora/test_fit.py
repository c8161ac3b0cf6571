import math

import pytest
import torch
from activations import correlated, gram

from compressor import linalg
from compressor.errors import CompressorError
from compressor.methods.eora.fit import allocate_ranks, eora_fit, removed_share
from compressor.methods.gptq.solver import QuantConfig, gptq_quantize


def eora_adapters(dW, H, rank, eps=None):
    B, A, _ = eora_fit(dW, H, rank, eps)
    return B, A


def svd_adapters(dW, rank):
    """The baseline EoRA must beat: a truncated SVD of dW itself (the weight error, not the output's)."""
    (U, S, Vh), = linalg.svd([dW.to(torch.float64)], dtype=torch.float64)
    B, A = linalg.split_factors(U, S, Vh, rank)
    return B.float(), A.float()

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


@pytest.mark.parametrize("rank", [1, 8, 32])
def test_propagation_fits_the_dense_output_as_a_float64_regression(case, rank):
    """With drift = W (K - H), the adapters minimise ||X_d W^T - X W_hat^T - X (B A)^T||: their
    error equals the optimum of that reduced-rank regression (projection onto X's columns,
    truncated SVD), and beats plain EoRA's on it."""
    dW, X = case
    gen = torch.Generator().manual_seed(3)
    X = X.double()
    Xd = X + 0.3 * correlated(X.shape[0], X.shape[1]).double() @ torch.randn(X.shape[1], X.shape[1], generator=gen).double() / 16
    W = torch.randn(dW.shape, generator=gen, dtype=torch.float64) / 16
    W_hat = W - dW.double()
    N = X.shape[0]
    H, K = X.T @ X / N, Xd.T @ X / N
    Y = Xd @ W.T - X @ W_hat.T  # what the adapters should add, token by token

    def err(B, A):
        return (Y - X @ (B.double() @ A.double()).T).norm().item() / math.sqrt(N)

    # float64 reference: the best rank-r map from X's column space, via X's thin SVD
    U, s, _ = torch.linalg.svd(X, full_matrices=False)
    sv = torch.linalg.svdvals(U.T @ Y)
    P = Y - U @ (U.T @ Y)  # part of Y no map of X can reach
    best = math.sqrt((P.norm().item() ** 2 + sv[rank:].square().sum().item()) / N)

    B, A, energies = eora_fit(dW.double(), H, rank, drift=W @ (K - H))
    assert math.isclose(err(B, A), best, rel_tol=1e-6)
    # X's smallest eigen-directions (below max * in * eps_float32) are truncated: agreement to ~1e-6
    assert torch.allclose(energies, sv.square() / N, rtol=1e-5, atol=1e-5 * energies[0].item())
    Bp, Ap = eora_adapters(dW.double(), H, rank)
    assert err(B, A) < err(Bp, Ap)


def test_zero_drift_is_plain_eora(case):
    dW, X = case
    H = gram(X)
    B, A, e = eora_fit(dW, H, 8, drift=torch.zeros_like(dW))
    B0, A0, e0 = eora_fit(dW, H, 8)
    assert torch.allclose(B @ A, B0 @ A0, atol=1e-7) and torch.allclose(e, e0)
    with pytest.raises(CompressorError, match="drift has shape"):
        eora_fit(dW, H, 8, drift=dW.T)


def test_damped_drift_is_eora_of_the_ridge_correction(case):
    """damp d: the fit equals plain EoRA of dW + drift (H + d mean(L) I)^-1, the ridge estimate
    of the correction, and shrinks toward plain EoRA as d grows."""
    dW, X = case
    H = gram(X)
    drift = torch.randn(dW.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.01
    lam = torch.linalg.eigvalsh(H)
    ridge = drift @ torch.linalg.inv(H + 0.1 * lam.mean() * torch.eye(H.shape[0], dtype=torch.float64))
    B, A, e = eora_fit(dW.double(), H, 8, drift=drift, damp=0.1)
    Br, Ar, er = eora_fit(dW.double() + ridge, H, 8)
    assert torch.allclose(B @ A, Br @ Ar, rtol=1e-8, atol=1e-10) and torch.allclose(e, er, rtol=1e-8)
    B0, A0 = eora_adapters(dW.double(), H, 8)
    def fitted(d):
        B, A, _ = eora_fit(dW.double(), H, 8, drift=drift, damp=d)
        return B @ A

    gaps = [(fitted(d) - B0 @ A0).norm().item() for d in (0.01, 1.0, 100.0)]
    assert gaps[0] > gaps[1] > gaps[2]

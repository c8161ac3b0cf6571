import math

import pytest
import torch

from compressor import eora
from compressor.errors import CompressorError
from compressor.methods.eora import Eora, EoraConfig, effective_weight
from compressor.modules import LoraAdapted, LowRankLinear, LowRankSparseLinear
from compressor.quant import QuantConfig, QuantLinear, rtn_quantize


def test_effective_weight_is_what_the_module_computes():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen)
    sparse = LowRankSparseLinear(64, 32, 8, 4, bias=False)
    with torch.no_grad():
        for p in sparse.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        sparse.sparse_cols.copy_(torch.tensor([1, 7, 30, 63]))
    q = QuantLinear.from_result(rtn_quantize(torch.randn(32, 64, generator=gen), QuantConfig(bits=4, group_size=32)), 32)
    for m in (sparse, q, torch.nn.Linear(64, 32, bias=False)):
        assert torch.allclose(m(x), x @ effective_weight(m).T, atol=1e-4)


def test_attach_and_merge_equal_adapter_arithmetic():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 64, generator=gen)
    H = x.T.double() @ x.double() / x.shape[0]
    W = torch.randn(32, 64, generator=gen)
    m = LowRankLinear(64, 32, 6, bias=True)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    stage = Eora(EoraConfig(rank=4))
    B, A, energies = stage.adapters(W, m, H, 4)
    assert energies.shape == (32,) and (energies[:-1] >= energies[1:]).all()
    B_ref, A_ref = eora.eora_adapters(W.double() - effective_weight(m).double(), H, 4)
    assert torch.allclose(B @ A, B_ref @ A_ref)
    want = m(x) + x @ (B @ A).float().T
    wrapped, spec = stage.attach(m, B, A, {"rank": 6})
    assert isinstance(wrapped, LoraAdapted) and spec == {"rank": 6}
    assert torch.allclose(wrapped(x), want, atol=1e-4)
    merged, spec = Eora(EoraConfig(rank=4, merge=True)).attach(m, B, A, {"rank": 6})
    assert spec == {"rank": 10} and merged.rank == 10
    assert torch.allclose(merged(x), want, atol=1e-4)


def test_merge_refuses_quantised():
    q = QuantLinear.from_result(rtn_quantize(torch.randn(32, 64), QuantConfig(bits=4, group_size=32)), 32)
    with pytest.raises(CompressorError, match="unquantised low-rank weights only"):
        Eora(EoraConfig(rank=2, merge=True)).attach(q, torch.zeros(32, 2), torch.zeros(2, 64), {})


def test_rank_pattern_first_match():
    stage = Eora(EoraConfig(rank=8, rank_pattern={"mlp.*": 16, "*": 4}))
    assert stage.rank_for("mlp.up_proj") == 16 and stage.rank_for("self_attn.q_proj") == 4


def _output_weights(weighting, gen):
    """(what the stage is given, the left factor L of its objective ||L (dW - B A) X||, and a
    rival weighting that must do worse on that objective)."""
    if weighting == "loss":
        D = torch.rand(40, generator=gen, dtype=torch.float64) ** 4  # a few channels dominate
        return D, torch.diag(D.sqrt()), None
    # loss gradients that share a few directions: strongly correlated output channels
    grads = torch.randn(300, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 40, generator=gen, dtype=torch.float64)
    grads += 0.05 * torch.randn(300, 40, generator=gen, dtype=torch.float64)
    G = grads.T @ grads / grads.shape[0]
    lam, P = torch.linalg.eigh(G)
    return G, (P * lam.clamp_min(0).sqrt()) @ P.T, G.diagonal()


@pytest.mark.parametrize("weighting", ["loss", "loss-full"])
def test_loss_weighting_is_optimal_for_the_weighted_error(weighting):
    """loss: output weights D, objective ||diag(sqrt D) (dW - B A) X||, rival the unweighted fit;
    loss-full: output Gram G, objective ||G^1/2 (dW - B A) X||, rival the fit on G's diagonal.
    Checked against the float64 optimum (the tail of the singular values of L dW X^T) and the
    rival, which must do worse on that objective."""
    gen = torch.Generator().manual_seed(3)
    # well conditioned, so no eigenvalue of H falls under the truncation eps
    X = torch.randn(400, 48, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3, 48, dtype=torch.float64)
    H = X.T @ X / X.shape[0]
    W = torch.randn(40, 48, generator=gen, dtype=torch.float64)
    m = torch.nn.Linear(48, 40, bias=False, dtype=torch.float64)
    with torch.no_grad():
        # effective_weight reads modules in float32: give it values float32 holds exactly
        m.weight.copy_(torch.randn(40, 48, generator=gen).double())
    given, L, rival = _output_weights(weighting, gen)
    stage = Eora(EoraConfig(rank=6, weighting=weighting))
    dW = W - m.weight.detach()
    err = lambda B, A: (L @ (dW - B @ A) @ X.T).norm().item()  # noqa: E731
    B, A, energies = stage.adapters(W, m, H, 6, given)
    S = torch.linalg.svdvals(L @ dW @ X.T)
    assert math.isclose(err(B, A), S[6:].square().sum().sqrt().item(), rel_tol=1e-8)
    assert torch.allclose(energies, S.square() / X.shape[0], rtol=1e-8, atol=1e-10 * energies[0].item())
    Br, Ar, _ = stage.adapters(W, m, H, 6, rival)
    assert err(B, A) < 0.95 * err(Br, Ar)


def test_unknown_weighting_is_refused():
    with pytest.raises(CompressorError, match="unknown weighting 'fisher'; choose one of: output, loss, loss-full"):
        Eora(EoraConfig(weighting="fisher"))


@pytest.mark.parametrize("weighting", ["output", "loss", "loss-full"])
def test_propagation_is_optimal_for_the_blended_target(weighting):
    """With propagation a and K = X_d^T X / N, the stage fits L (a X_d W^T + (1 - a) X W^T -
    X W_hat^T) with X (B A)^T: its error equals the float64 optimum of that weighted reduced-rank
    regression (projection onto X's columns, then the singular-value tail), and the fit without
    propagation (which ignores K) does worse on it."""
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(400, 48, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3, 48, dtype=torch.float64)
    Xd = X + 0.3 * torch.randn(400, 48, generator=gen, dtype=torch.float64) @ torch.randn(48, 48, generator=gen, dtype=torch.float64) / 7
    N = X.shape[0]
    H, K = X.T @ X / N, Xd.T @ X / N
    W = torch.randn(40, 48, generator=gen, dtype=torch.float64)
    m = torch.nn.Linear(48, 40, bias=False, dtype=torch.float64)
    with torch.no_grad():  # a small error, in values float32 holds exactly
        m.weight.copy_((W + 0.1 * torch.randn(40, 48, generator=gen, dtype=torch.float64)).float().double())
    given, L, _ = _output_weights(weighting, gen) if weighting != "output" else (None, torch.eye(40, dtype=torch.float64), None)
    Y = (0.5 * Xd + 0.5 * X) @ W.T - X @ m.weight.detach().T
    err = lambda B, A: (L @ (Y - X @ (B @ A).T).T).norm().item()  # noqa: E731
    U, _, _ = torch.linalg.svd(X, full_matrices=False)
    T = L @ Y.T  # out x N
    S = torch.linalg.svdvals(T @ U)
    unreachable = (T - T @ U @ U.T).norm().item()  # no map of X produces this part
    best = math.sqrt(unreachable ** 2 + S[6:].square().sum().item())
    reachable = lambda B, A: math.sqrt(err(B, A) ** 2 - unreachable ** 2)  # noqa: E731

    half = Eora(EoraConfig(rank=6, weighting=weighting, propagation=0.5))
    B, A, energies = half.adapters(W, m, H, 6, given, K)
    assert math.isclose(err(B, A), best, rel_tol=1e-8)
    assert torch.allclose(energies, S.square() / N, rtol=1e-8, atol=1e-10 * energies[0].item())
    B0, A0, _ = Eora(EoraConfig(rank=6, weighting=weighting)).adapters(W, m, H, 6, given, K)  # propagation 0 ignores K
    assert reachable(B, A) < 0.99 * reachable(B0, A0)

import math

import pytest
import torch

from compressor.errors import CompressorError
from compressor.methods.eora import Eora, EoraConfig
from compressor.methods.eora import fit as eora
from compressor.methods.gptq.solver import QuantConfig, rtn_quantize, to_module
from compressor.modules import LoraAdapted, LowRankLinear, LowRankSparseLinear, ModuleSpec, effective_weight


def test_effective_weight_is_what_the_module_computes():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen)
    sparse = LowRankSparseLinear(64, 32, 8, 4, bias=False)
    with torch.no_grad():
        for p in sparse.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        sparse.sparse_cols.copy_(torch.tensor([1, 7, 30, 63]))
    q = to_module(rtn_quantize(torch.randn(32, 64, generator=gen), QuantConfig(bits=4, group_size=32)), 32)
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
    B_ref, A_ref, _ = eora.eora_fit(W.double() - effective_weight(m).double(), H, 4)
    assert torch.allclose(B @ A, B_ref @ A_ref)
    want = m(x) + x @ (B @ A).float().T
    wrapped, spec = stage.attach(m, B, A, ModuleSpec("lowrank", 32, 64, False, rank=6))
    assert isinstance(wrapped, LoraAdapted) and spec.rank == 6
    assert torch.allclose(wrapped(x), want, atol=1e-4)
    merged, spec = Eora(EoraConfig(rank=4, merge=True)).attach(m, B, A, ModuleSpec("lowrank", 32, 64, False, rank=6))
    assert spec.rank == 10 and merged.rank == 10
    assert torch.allclose(merged(x), want, atol=1e-4)


def test_merge_refuses_quantised():
    q = to_module(rtn_quantize(torch.randn(32, 64), QuantConfig(bits=4, group_size=32)), 32)
    with pytest.raises(CompressorError, match="unquantised low-rank weights only"):
        Eora(EoraConfig(rank=2, merge=True)).attach(q, torch.zeros(32, 2), torch.zeros(2, 64), ModuleSpec("quant", 32, 64, False, bits=4, group_size=32))


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
    with pytest.raises(CompressorError, match="key 'weighting' must be one of output, loss, loss-full; got 'fisher'"):
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


def _recording_gptq(H, cfg):
    """A refine `quantize` callable (GPTQ against H) and the list of weights it was given."""
    from compressor.methods.gptq.solver import gptq_quantize

    seen = []

    def quantize(w):
        seen.append(w.clone())
        return to_module(gptq_quantize(w, H, cfg), cfg.group_size), {"type": "quant"}

    return quantize, seen


def test_refine_fits_base_and_adapters_to_each_other():
    """refine alternates GPTQ of W - B A with the adapters' fit to W - Q. On a weight whose large
    low-rank part dominates the grid's range, plain EoRA (GPTQ of W, then the fit) leaves most of
    the error, while refining lets B A hold that part and the grid the small rest. Each round's
    base is GPTQ of the previous round's W - B A, and the returned adapters are the fit to the
    returned base's error."""
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(600, 64, generator=gen) @ torch.randn(64, 64, generator=gen) / 8  # correlated inputs
    H = X.T.double() @ X.double() / X.shape[0]
    W = 3 * torch.randn(64, 4, generator=gen) @ torch.randn(4, 64, generator=gen) + 0.05 * torch.randn(64, 64, generator=gen)
    quantize, seen = _recording_gptq(H, QuantConfig(bits=3, group_size=32))
    err = lambda M: torch.trace(M @ H @ M.T).item()  # noqa: E731
    stage = Eora(EoraConfig(rank=4, refine=3))
    module, spec, B, A, energies = stage.refined(W, quantize, H, 4)
    assert len(seen) == 3 and spec == {"type": "quant"}
    plain_q, _ = quantize(W)
    B0, A0, _ = stage.adapters(W, plain_q, H, 4)
    refined_err = err(W.double() - effective_weight(module).double() - (B @ A).double())
    plain_err = err(W.double() - effective_weight(plain_q).double() - (B0 @ A0).double())
    assert refined_err < 0.2 * plain_err, (refined_err, plain_err)
    B_ref, A_ref, e_ref = stage.adapters(W, module, H, 4)
    assert torch.allclose(B @ A, B_ref @ A_ref) and torch.allclose(energies, e_ref)
    # the first base quantises W minus the adapters' fit to W itself
    B1, A1, _ = eora.eora_fit(W.double(), H, 4)
    assert torch.allclose(seen[0], (W.double() - B1.double() @ A1.double()).float(), atol=1e-5)


def test_refine_applies_propagation_once():
    """With propagation, the bases are those of the run without it (the earlier fits ignore the
    dense model's inputs) and only the last fit aims at the dense output: were the correction in
    every fit, each base would round it away and the next fit add it again."""
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(500, 64, generator=gen, dtype=torch.float64) * torch.linspace(0.3, 2, 64, dtype=torch.float64)
    Xd = X + 0.2 * torch.randn(500, 64, generator=gen, dtype=torch.float64)
    H, K = X.T @ X / 500, Xd.T @ X / 500
    W = torch.randn(64, 64, generator=gen)

    def run(stage, cross):
        quantize, seen = _recording_gptq(H, QuantConfig(bits=4, group_size=32))
        module, _, B, A, _ = stage.refined(W, quantize, H, 4, None, cross)
        return seen, module, B, A

    propagated = Eora(EoraConfig(rank=4, refine=2, propagation=0.5))
    seen, module, B, A = run(propagated, K)
    seen0, _, B0, A0 = run(Eora(EoraConfig(rank=4, refine=2)), None)
    assert all(torch.equal(a, b) for a, b in zip(seen, seen0)) and len(seen) == 2
    B_ref, A_ref, _ = propagated.adapters(W, module, H, 4, None, K)
    assert torch.allclose(B @ A, B_ref @ A_ref) and not torch.allclose(B @ A, B0 @ A0, atol=1e-3)


def test_refine_must_be_a_round_count():
    with pytest.raises(CompressorError, match="key 'refine' must be an integer >= 0, got -1"):
        Eora(EoraConfig(refine=-1))
    for bad in ({"sequential": False}, {"sequential": False, "rank_allocation": "per-type"}):
        with pytest.raises(CompressorError, match="refine fits the base to each module's final adapters"):
            Eora(EoraConfig(refine=2, **bad))

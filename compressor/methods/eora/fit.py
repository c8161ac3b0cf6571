"""Low-rank compensation adapters for a compressed weight (EoRA, Liu et al., arXiv 2410.21271).

Given the compression error dW = W - W_hat (out x in) and the input Gram H = X^T X / N, find
B (out x r), A (r x in) minimising ||(dW - B A) X||_F, so that y = W_hat x + B (A x) is as close to
W x as rank r allows on the calibration distribution.

With H = Q L Q^T, ||M X||_F^2 = N ||M Q L^1/2||_F^2 for every M, so the problem is a plain
truncated SVD in the eigenspace: dW Q L^1/2 = U S V^T, B = U_r S_r^1/2, A = S_r^1/2 V_r^T L^-1/2 Q^T.
Eigenvalues at or below eps are directions the data never visits: they are zeroed in both L^1/2
and L^-1/2 (a truncated pseudo-inverse, as GPTQModel does), which makes dW Q L^1/2 zero there, so
V_r has no component there and nothing is lost. The optimal error is then
||(dW - B A) X||_F = sqrt(N * sum_{i > r} S_i^2).

Propagation (after QEP, Arai and Ichikawa, arXiv 2504.09629): when earlier layers were compressed
too, this layer's input X differs from the dense model's X_d, and the output the model should
produce is X_d W^T, not X W^T. Minimising ||X_d W^T - X W_hat^T - X (B A)^T||_F over B A expands,
with K = X_d^T X / N, to the same truncated SVD of a shifted target,
dW Q L^1/2 + W (K - H) Q L^-1/2, so `drift` = alpha W (K - H) adds that second term (alpha in
[0, 1]: how much of the inherited error to correct; 0 is plain EoRA). Dividing by sqrt(l_i) stays
bounded on the calibration data (W (K - H) q_i is at most ||W (X_d - X)^T||_2 sqrt(l_i / N)), but in
directions the data barely visits it fits noise that does not recur on other text. `damp` d
replaces L^-1/2 there by L^1/2 (L + d mean(L))^-1, i.e. the drift correction becomes the ridge
estimate W (K - H) (H + d mean(L) I)^-1 (GPTQ's and QEP's damping of H) before the same SVD.
"""

from __future__ import annotations

import torch

from compressor import linalg
from compressor.errors import CompressorError, shown


def _check(dW: torch.Tensor, rank: int) -> int:
    if dW.dim() != 2:
        raise CompressorError(f"adapter target must be a 2-D weight difference, got shape {tuple(dW.shape)}")
    if not isinstance(rank, int) or rank < 1:
        raise CompressorError(f"adapter rank must be a positive integer, got {shown(rank)}")
    return min(rank, *dW.shape)


def gram_eigen(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, Q) of the symmetrised Gram in float64; linears sharing an input can share this."""
    H = H.to(torch.float64)
    (lam, Q), = linalg.eigh([(H + H.T) / 2], dtype=torch.float64)
    return lam, Q


def eora_spectrum(dW: torch.Tensor, H: torch.Tensor, eps: float | None = None, eigen=None, drift: torch.Tensor | None = None, damp: float = 0.0):
    """(U, S, Vh, inv_root, Q) of dW Q L^1/2 (+ drift Q L^1/2 (L + d)^-1, d = damp * mean(L)),
    float64, with eigenvalues <= eps truncated."""
    in_f = dW.shape[1]
    if tuple(H.shape) != (in_f, in_f):
        raise CompressorError(f"input Gram has shape {tuple(H.shape)} but the weight has {in_f} input features")
    lam, Q = gram_eigen(H.to(dW.device)) if eigen is None else eigen
    if eps is None:
        eps = lam.max().clamp_min(0).item() * in_f * torch.finfo(torch.float32).eps
    keep = lam > eps
    root = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    inv_root = torch.where(keep, 1 / root.where(keep, torch.ones_like(root)), torch.zeros_like(lam))
    target = dW.to(torch.float64) @ (Q * root)
    if drift is not None:
        if drift.shape != dW.shape:
            raise CompressorError(f"drift has shape {tuple(drift.shape)} but the weight error has {tuple(dW.shape)}")
        gain = inv_root if not damp else root / (lam.clamp_min(0) + damp * lam.clamp_min(0).mean())
        target = target + (drift.to(device=dW.device, dtype=torch.float64) @ Q) * gain
    (U, S, Vh), = linalg.svd([target], dtype=torch.float64)
    return U, S, Vh, inv_root, Q


def eora_fit(dW: torch.Tensor, H: torch.Tensor, rank: int, eps: float | None = None, eigen=None, drift: torch.Tensor | None = None,
             damp: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """eora_adapters plus the energies S_i^2 of every component (float64, CPU, descending):
    component i removes S_i^2 of the squared calibration output error ||dW X||^2 / N (with
    `drift`, of the part of the error against the dense model's output that X can explain), so
    the top-k truncation of B and A is the optimal rank-k adapter for every k <= r."""
    r = _check(dW, rank)
    U, S, Vh, inv_root, Q = eora_spectrum(dW, H, eps, eigen, drift, damp)
    B, A = linalg.split_factors(U, S, Vh, r)
    A = (A * inv_root) @ Q.T
    dtype = dW.dtype if dW.is_floating_point() else torch.float32
    return B.to(dtype), A.to(dtype), S.square().cpu()


def removed_share(energies: torch.Tensor, rank: int) -> float:
    """Share of the squared output error that the top `rank` components remove (0 if there is none)."""
    total = energies.sum().item()
    return energies[:rank].sum().item() / total if total > 0 else 0.0


def allocate_ranks(energies: dict[str, torch.Tensor], costs: dict[str, int], ranks: dict[str, int], pools: dict[str, str],
                   cap: dict[str, int]) -> dict[str, int]:
    """Per module, an adapter rank (0: none) that spends each pool's parameters where they remove
    the most output error.

    Component i of module n removes energies[n][i] of its squared output error and costs costs[n]
    = out + in parameters (a column of B, a row of A). A pool has the parameters its modules'
    nominal `ranks` would use; its components are taken greedily by error removed per parameter
    while they fit. Energies descend and a module's components cost the same, so each module gets
    a prefix of its components, at most cap[n] of them.
    """
    members: dict[str, list[str]] = {}
    for name in energies:
        members.setdefault(pools[name], []).append(name)
    out = {}
    for names in members.values():
        left = sum(ranks[n] * costs[n] for n in names)
        offers = sorted(((e / costs[n], n) for n in names for e in energies[n][: cap[n]].tolist()), reverse=True)
        taken = dict.fromkeys(names, 0)
        for _, n in offers:
            if costs[n] <= left:
                taken[n] += 1
                left -= costs[n]
        out.update(taken)
    return out

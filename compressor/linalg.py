"""Every decomposition the toolkit performs goes through here.

The interface is batched: callers hand over lists of matrices, and matrices of equal shape are
stacked into one batched call. This is the one place where device, precision and the choice of
algorithm are decided, so speed work (GPU drivers, randomized SVD, eigh of Grams) lands here only.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from compressor.errors import CompressorError


def _by_shape(mats: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        groups[tuple(m.shape)].append(i)
    return groups


@contextlib.contextmanager
def _cpu_lapack_threads(device: torch.device):
    """CPU LAPACK decompositions run single-threaded.

    Measured on the 2-core CI machine (torch 2.13 CPU): svd of a 64x96 matrix took 0.25 s with two
    threads and 0.002 s with one; of a 2048x2048 matrix 12.3 s against 5.3 s. Matrix products
    elsewhere keep all threads.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batched(fn: Callable, mats: Sequence[torch.Tensor], dtype: torch.dtype) -> list:
    """Apply fn to stacks of same-shape matrices; return per-matrix results in input order."""
    out: list = [None] * len(mats)
    for idx in _by_shape(mats).values():
        stack = torch.stack([mats[i].to(dtype) for i in idx])
        with _cpu_lapack_threads(stack.device):
            result = fn(stack)
        parts = result if isinstance(result, tuple) else (result,)
        for j, i in enumerate(idx):
            per = tuple(p[j] for p in parts)
            out[i] = per if isinstance(result, tuple) else per[0]
    return out


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise CompressorError(f"{name} contains NaN or Inf values; the checkpoint is corrupt or was loaded in too low a precision (try --dtype float32)")


def svd(mats: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Thin SVD (U, S, Vh) of each matrix, batched by shape."""
    return _batched(lambda x: torch.linalg.svd(x, full_matrices=False), mats, dtype)


def svdvals(mats: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Singular values of each matrix, descending, batched by shape."""
    return _batched(torch.linalg.svdvals, mats, dtype)


def eigh(mats: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eigen-decomposition (ascending eigenvalues, eigenvectors) of symmetric matrices."""
    return _batched(torch.linalg.eigh, mats, dtype)


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors (up, down) with up @ down = U_k S_k Vh_k, balanced as U sqrt(S), sqrt(S) Vh.

    Balancing keeps both factors on the same scale, which matters once they are stored in 16 bits
    or quantised.
    """
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def whitening(grams: Sequence[torch.Tensor], damp: float = 1e-3, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each Gram H, a pair (S, S_inv) with S S^T = H + delta I, S = Q L^1/2, S_inv = L^-1/2 Q^T.

    delta = damp * mean(diag H) keeps S invertible when H is singular or badly conditioned (unused
    input channels, tiny calibration sets); eigenvalues are then floored at a relative epsilon so
    that rounding in eigh can never produce a negative or zero root. Never NaN, never a crash.
    """
    damped = []
    for h in grams:
        h = h.to(dtype)
        h = (h + h.T) / 2
        delta = damp * h.diagonal().mean().clamp_min(torch.finfo(dtype).tiny)
        damped.append(h + delta * torch.eye(h.shape[0], dtype=dtype, device=h.device))
    out = []
    for lam, q in eigh(damped, dtype):
        lam = lam.clamp_min(lam.max() * torch.finfo(dtype).eps * lam.numel())
        root = lam.sqrt()
        out.append((q * root, q.T / root[:, None]))
    return out

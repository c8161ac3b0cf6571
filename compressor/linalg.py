"""Every decomposition the toolkit performs goes through here.

The interface is batched: callers hand over lists of matrices, and matrices of equal shape are
stacked into one batched call. This is the one place where device, precision and the choice of
algorithm are decided, so speed work (GPU drivers, randomized SVD, eigh of Grams) lands here only.

Which algorithm, and why (timings on one H100 for a 4096x4096 fp32 matrix, from issue 6):
- full SVD (torch.linalg.svd): 1.12 s. Exact, used when no rank is known or the matrix is small.
- "gram": eigh of the smaller Gram W W^T (or W^T W) in float64, 0.13 s. Squaring the condition
  number costs nothing that matters here: in float64 the top components are exact to ~1e-8 of the
  largest singular value, far below any truncation error, while the Gram product is one GEMM.
- "randomized": a range finder with power iterations, then the Gram path on the small projected
  matrix; 0.10 s at rank 1024. Only when the target rank is at most an eighth of the smaller
  dimension (RANDOMIZED_MAX_FRACTION): beyond that it does more work than the Gram path and needs
  more iterations to be accurate on the flat spectra of LLM weights.
- "gesvda" (CUDA only): cuSOLVER's approximate driver, offered on request, never chosen
  automatically, because its accuracy is not guaranteed for ill-conditioned inputs.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from compressor.errors import CompressorError

ALGORITHMS = ("auto", "full", "gram", "randomized", "gesvda")
# Below this smaller dimension the exact LAPACK/cuSOLVER SVD is already cheap (milliseconds), and
# exactness keeps the small-model tests independent of which fast path is taken.
FAST_MIN_DIM = 512
# Randomized SVD only pays off for small ranks: its cost grows with the rank while the Gram path's
# does not, and near a quarter of the smaller side it is no faster and already above the optimal
# error where the Gram path is exact, so the crossover is set at 1/8
# (benchmarks/bench_decompose.py --algorithms measures both).
RANDOMIZED_MAX_FRACTION = 0.125
POWER_ITERS = 4
# Host memory a batched CPU call may stack at once; batching brings no speed on CPU, only memory.
CPU_BATCH_BYTES = 1 << 30
# Fraction of free GPU memory one batched call may use; the rest is headroom for the caller.
GPU_BATCH_FRACTION = 0.5


def _by_shape(mats: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        groups[(tuple(m.shape), m.device)].append(i)
    return groups


@contextlib.contextmanager
def _cpu_lapack_threads(device: torch.device):
    """CPU LAPACK decompositions run single-threaded.

    On CPU, LAPACK's SVD and eigh run slower with several threads than with one, from tiny to
    2048-wide matrices (thread start-up and contention outweigh the split). Matrix products
    elsewhere keep all threads, which is why the fast paths below enter this only around the
    LAPACK call itself and not around their Gram products.
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


def _lapack(fn: Callable, x: torch.Tensor, **kwargs):
    with _cpu_lapack_threads(x.device):
        return fn(x, **kwargs)


def batch_size(count: int, per_matrix_bytes: int, device: torch.device) -> int:
    """How many same-shape matrices one batched call may take without exhausting memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_BATCH_FRACTION)
    else:
        budget = CPU_BATCH_BYTES
    return max(1, min(count, budget // max(per_matrix_bytes, 1)))


def _workspace_bytes(shape: tuple, algorithm: str, dtype: torch.dtype) -> int:
    m, n = shape[-2], shape[-1]
    small, item = min(m, n), torch.empty((), dtype=dtype).element_size()
    if algorithm in ("gram", "randomized"):
        # float64 copy of W, the Gram, its eigenvectors and the product U^T W.
        return 8 * (2 * m * n + 2 * small * small) + item * m * n
    return item * (2 * m * n + small * small + m * m // max(1, m // small))


def _batched(fn: Callable, mats: Sequence[torch.Tensor], dtype: torch.dtype, algorithm: str = "full") -> list:
    """Apply fn to stacks of same-shape matrices; return per-matrix results in input order."""
    out: list = [None] * len(mats)
    for (shape, device), idx in _by_shape(mats).items():
        step = batch_size(len(idx), _workspace_bytes(shape, algorithm, dtype), device)
        for start in range(0, len(idx), step):
            chunk = idx[start : start + step]
            stack = torch.stack([mats[i].to(dtype) for i in chunk])
            result = fn(stack)
            del stack
            parts = result if isinstance(result, tuple) else (result,)
            for j, i in enumerate(chunk):
                per = tuple(p[j] for p in parts)
                out[i] = per if isinstance(result, tuple) else per[0]
    return out


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise CompressorError(f"{name} contains NaN or Inf values; the checkpoint is corrupt or was loaded in too low a precision (try --dtype float32)")


def choose(shape: tuple, rank: int | None, device: torch.device, algorithm: str = "auto") -> str:
    """The SVD algorithm `svd` uses for a matrix of `shape` truncated to `rank`."""
    if algorithm not in ALGORITHMS:
        raise CompressorError(f"unknown SVD algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    small = min(shape[-2:])
    if algorithm == "gesvda" and device.type != "cuda":
        return "full"
    if algorithm != "auto":
        return algorithm if rank is not None or algorithm in ("full", "gesvda") else "full"
    if rank is None or small < FAST_MIN_DIM or rank >= small:
        return "full"
    if rank <= RANDOMIZED_MAX_FRACTION * small:
        return "randomized"
    return "gram"


def _gram_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of a stack of matrices via eigh of the smaller float64 Gram."""
    w = w.to(torch.float64)
    tall = w.shape[-2] > w.shape[-1]
    a = w.mT if tall else w  # a is wide: its left singular vectors come from the small Gram a a^T
    _, q = _lapack(torch.linalg.eigh, a @ a.mT)
    basis = q[..., -rank:].flip(-1)
    proj = basis.mT @ a  # = S_k V_k^T
    # Singular values as the norms of the projected rows, not sqrt(eigenvalues): exact to working
    # precision even for small ones, and they make V's rows unit length by construction.
    s = proj.norm(dim=-1)
    tiny = s.amax(dim=-1, keepdim=True) * torch.finfo(torch.float64).eps * a.shape[-1]
    inv = torch.where(s > tiny, 1.0 / s.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(s))
    vh = proj * inv[..., None]
    order = s.argsort(dim=-1, descending=True)
    s = s.gather(-1, order)
    basis = basis.gather(-1, order[..., None, :].expand_as(basis))
    vh = vh.gather(-2, order[..., :, None].expand_as(vh))
    if tall:
        return vh.mT, s, basis.mT
    return basis, s, vh


def _randomized_svd(w: torch.Tensor, rank: int, oversample: int | None = None, iters: int = POWER_ITERS):
    """Top-`rank` SVD of a stack by a seeded range finder (Halko, Martinsson, Tropp 2011).

    The test matrix comes from a fixed seed so that the same input always gives the same factors:
    resumed runs must be byte-identical to uninterrupted ones. Each power iteration is
    re-orthonormalised, otherwise float32 rounding flattens the subspace to the top direction.
    """
    m, n = w.shape[-2:]
    # Oversampling by the rank itself: LLM weight spectra are flat, and with the usual +10 columns
    # four power iterations leave the truncation error visibly above optimal on such spectra; with
    # 2x the rank it stays within 1e-3 of it (tests/test_linalg.py checks that bound).
    extra = oversample if oversample is not None else rank
    width = min(min(m, n), rank + extra)
    gen = torch.Generator(device=w.device).manual_seed(0)
    omega = torch.randn(*w.shape[:-2], n, width, generator=gen, device=w.device, dtype=w.dtype)
    q, _ = _lapack(torch.linalg.qr, w @ omega)
    for _ in range(iters):
        z, _ = _lapack(torch.linalg.qr, w.mT @ q)
        q, _ = _lapack(torch.linalg.qr, w @ z)
    # B = Q^T W is width x n: its SVD, through the float64 Gram path, is cheap.
    u_b, s, vh = _gram_svd(q.mT @ w, min(rank, width))
    return q.to(torch.float64) @ u_b, s, vh


def svd(
    mats: Sequence[torch.Tensor],
    dtype: torch.dtype = torch.float32,
    ranks: int | Sequence[int | None] | None = None,
    algorithm: str = "auto",
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Thin SVD (U, S, Vh) of each matrix, batched by shape, returned in `dtype`.

    With `ranks` (one for all, or one per matrix), only the top components are needed, and at least
    that many are returned (matrices of one shape share the largest rank asked of them), which lets
    the fast paths (see the module docstring and `choose`) replace the full decomposition.
    """
    if ranks is None or isinstance(ranks, int):
        ranks = [ranks] * len(mats)
    if len(ranks) != len(mats):
        raise CompressorError(f"svd: {len(mats)} matrices but {len(ranks)} ranks")
    out: list = [None] * len(mats)
    plans: dict[tuple, list[int]] = defaultdict(list)
    for i, (m, r) in enumerate(zip(mats, ranks)):
        plans[(tuple(m.shape), m.device, choose(tuple(m.shape), r, m.device, algorithm))].append(i)
    for (shape, _, algo), idx in plans.items():
        rank = None if any(ranks[i] is None for i in idx) else max(ranks[i] for i in idx)
        if algo == "gram":
            fn = lambda x, r=rank: _gram_svd(x, r)  # noqa: E731
        elif algo == "randomized":
            fn = lambda x, r=rank: _randomized_svd(x, r)  # noqa: E731
        elif algo == "gesvda":
            fn = lambda x: torch.linalg.svd(x, full_matrices=False, driver="gesvda")  # noqa: E731
        else:
            fn = lambda x: _lapack(torch.linalg.svd, x, full_matrices=False)  # noqa: E731
        work = dtype if algo in ("full", "gesvda") else (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
        for i, res in zip(idx, _batched(fn, [mats[i] for i in idx], work, algo)):
            out[i] = tuple(t.to(dtype) for t in canonical_signs(*res))
    return out


def canonical_signs(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same SVD with every component's sign fixed: the largest-magnitude entry of each column
    of U is positive (V's row follows, so U S Vh is unchanged).

    A singular pair is only defined up to sign, and LAPACK, cuSOLVER, the Gram and the randomized
    paths each pick their own. The product does not care, but quantising a factor does: GPTQ rounds
    the rows of `up`, and flipping one of its columns changes every row's range and so its codes.
    Without this, the same recipe on CUDA and on CPU gave two equally good but different models
    (welore30-gptq4-eora, issue 28: 0.6-0.8x the compression error apart).
    """
    idx = u.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(u.gather(-2, idx) < 0, -1.0, 1.0).to(u.dtype)  # (..., 1, k)
    return u * sign, s, vh * sign.mT.to(vh.dtype)


def svdvals(mats: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Singular values of each matrix, descending, batched by shape.

    Large matrices go through eigvalsh of the float64 Gram: callers use these values squared (as
    component energies), which that path gets to an absolute accuracy of ~1e-16 of the largest,
    at a fraction of the cost of a bidiagonalisation.
    """

    def via_gram(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        g = x @ x.mT if x.shape[-2] <= x.shape[-1] else x.mT @ x
        return _lapack(torch.linalg.eigvalsh, g).flip(-1).clamp_min(0).sqrt()

    def one(x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) >= FAST_MIN_DIM:
            return via_gram(x).to(dtype)
        # float64 on every device: rank allocations threshold these values, and float32 results
        # from LAPACK and cuSOLVER differ in the last digits (issue 28)
        return _lapack(torch.linalg.svdvals, x.to(torch.float64)).to(dtype)

    return _batched(one, mats, dtype, "gram")


def eigh(mats: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eigen-decomposition (ascending eigenvalues, eigenvectors) of symmetric matrices."""
    return _batched(lambda x: _lapack(torch.linalg.eigh, x), mats, dtype)


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
    Kept in float64 even on GPUs: the damped H still spans 5-6 decades, and S_inv multiplies by the
    inverse roots, so float32 eigenvalues would put O(1) relative errors on the smallest directions.
    Linears that read the same input (q/k/v, gate/up) get the same Gram object from the collector:
    it is factorised once and the pair shared.
    """
    distinct: dict[int, int] = {}  # id of a Gram -> its position among the distinct ones
    damped = []
    for h in grams:
        if id(h) in distinct:
            continue
        distinct[id(h)] = len(damped)
        h = h.to(dtype)
        h = (h + h.T) / 2
        delta = damp * h.diagonal().mean().clamp_min(torch.finfo(dtype).tiny)
        damped.append(h + delta * torch.eye(h.shape[0], dtype=dtype, device=h.device))
    pairs = []
    for lam, q in eigh(damped, dtype):
        lam = lam.clamp_min(lam.max() * torch.finfo(dtype).eps * lam.numel())
        root = lam.sqrt()
        pairs.append((q * root, q.T / root[:, None]))
    return [pairs[distinct[id(h)]] for h in grams]

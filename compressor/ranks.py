"""Rank allocation: turn spectra into per-matrix ranks under one global parameter budget.

A policy sees every targeted matrix at once (its shape and, where it needs them, the energies of its
components: squared singular values of whatever the method truncates) and returns, per matrix, a
rank or None for "keep dense". Every policy respects break-even: a matrix is only factorised when
the factors hold fewer parameters than the dense weight.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from compressor.errors import CompressorError

Shapes = dict[str, tuple[int, int]]
Ranks = dict[str, "int | None"]


def lowrank_params(shape: tuple[int, int], rank: int, extra: int = 0) -> int:
    out_f, in_f = shape
    return rank * (out_f + in_f) + extra


def max_saving_rank(shape: tuple[int, int], extra: int = 0) -> int:
    """Largest rank whose factors (plus `extra` stored values) hold fewer parameters than W."""
    out_f, in_f = shape
    return (out_f * in_f - extra - 1) // (out_f + in_f)


def params_after(shapes: Shapes, ranks: Ranks, extra: dict[str, int] | None = None) -> int:
    extra = extra or {}
    return sum(s[0] * s[1] if ranks[n] is None else lowrank_params(s, ranks[n], extra.get(n, 0)) for n, s in shapes.items())


def _budget(shapes: Shapes, ratio: float) -> float:
    return (1.0 - ratio) * sum(o * i for o, i in shapes.values())


def fixed(shapes: Shapes, rank: int, extra=None) -> Ranks:
    """One rank for every matrix; matrices where it would not save parameters stay dense."""
    extra = extra or {}
    ranks: Ranks = {}
    for name, shape in shapes.items():
        if rank > min(shape):
            raise CompressorError(
                f"rank {rank} is larger than {name} allows (shape {shape[0]}x{shape[1]}, max {min(shape)}); lower 'rank' in the recipe"
            )
        ranks[name] = rank if rank <= max_saving_rank(shape, extra.get(name, 0)) else None
    return ranks


def uniform(shapes: Shapes, ratio: float, energies=None, extra=None) -> Ranks:
    """Every matrix loses the same fraction of its parameters (the SVD-LLM / ASVD convention)."""
    extra = extra or {}
    ranks: Ranks = {}
    for name, (o, i) in shapes.items():
        k = int(((1.0 - ratio) * o * i - extra.get(name, 0)) / (o + i))
        if k < 1:
            raise CompressorError(f"ratio {ratio} leaves no rank for {name} after its sparse part; lower --ratio or sparse_fraction")
        ranks[name] = k
    return ranks


# Scores closer than this (relative) are one tie: kept or dropped together. Spectra are computed in
# float64 (linalg.svdvals), so the same weights on two devices give scores ~1e-15 apart; a threshold
# that fell between two such near-copies would make the ranks depend on the device's rounding.
TIE_RTOL = 1e-9


def tie_groups(values: torch.Tensor, rtol: float = TIE_RTOL) -> torch.Tensor:
    """The distinct thresholds worth trying: the smallest value of each group of sorted values whose
    neighbours lie within `rtol` of each other (relative, so a tail of tiny scores is not one group)."""
    v = torch.unique(values)  # sorted
    if v.numel() < 2:
        return v
    gap = v[1:] - v[:-1]
    new_group = gap > rtol * v[1:].abs()
    return torch.cat([v[:1], v[1:][new_group]])


# --- hardware-aligned ranks

# Tensor cores need GEMM sides that are multiples of 8 (bf16) and run best at 64-128; vLLM's
# GPTQ-Marlin kernel wants output sides divisible by 64 and input sides by 128.
DEFAULT_ALIGN = 64
QUANT_ALIGN = 128
MIN_ALIGN = 8  # below this a step buys nothing on tensor cores; smaller steps are not applied
ALIGN_SHARE = 16  # a step is at most 1/16 of the matrix's smaller side


def aligned_step(shape: tuple[int, int], align: int) -> int:
    """The multiple a rank of a matrix of `shape` is rounded to: the largest power of two that is
    at most `align` and at most 1/16 of the smaller side, or 1 (no rounding) when that is below 8.

    So a 4096-wide matrix gets the full 64 or 128, a 896-wide one 32, and the 64-wide matrices of
    the test models none: a step that is a large share of the side would move a rank far from its
    allocation (or to 0, or to full rank) for no speed, since such matrices are far from GEMM-bound.
    """
    cap = min(align, min(shape) // ALIGN_SHARE)
    step = 1
    while step * 2 <= cap:
        step *= 2
    return step if step >= MIN_ALIGN else 1


def align_ranks(shapes: Shapes, ranks: Ranks, target: float, align: int, extra: dict[str, int] | None = None) -> Ranks:
    """Round every rank to its aligned_step without exceeding the parameter budget `target`.

    Rounding direction: each rank first goes down to its multiple (so the total only falls), then
    whole steps are given back, largest rounding loss first (ties by name), while the total stays
    within `target` and the rank below break-even and full rank. The achieved reduction therefore
    still meets the ratio, and no rank moves by a step or more. A rank below one step is kept as it
    is (never rounded to 0); dense matrices (None) stay dense.
    """
    extra = extra or {}
    out: Ranks = dict(ranks)
    lost: dict[str, float] = {}
    steps: dict[str, int] = {}
    for name, k in ranks.items():
        step = aligned_step(shapes[name], align)
        if k is None or step == 1 or k < step or k % step == 0:
            continue
        out[name] = k - k % step
        steps[name] = step
        up = out[name] + step
        if up <= min(shapes[name]) and up <= max_saving_rank(shapes[name], extra.get(name, 0)):
            lost[name] = (k % step) / step
    total = params_after(shapes, out, extra)
    for name in sorted(lost, key=lambda n: (-lost[n], n)):
        more = steps[name] * sum(shapes[name])
        if total + more <= target:
            out[name] += steps[name]
            total += more
    return out


def _fit_threshold(shapes: Shapes, scores: dict[str, torch.Tensor], target: float, extra: dict[str, int]) -> Ranks:
    """Keep, in every matrix, the components whose score reaches one common threshold, choosing the
    threshold so total parameters fit under `target`. Scores must be non-increasing per matrix.

    Parameters only fall as the threshold rises (a matrix that turns dense does so only while its
    rank is above break-even), so a binary search over the sorted distinct scores is exact. Scores
    within TIE_RTOL of each other count as one (tie_groups), so rounding noise cannot split them.
    """

    def ranks_at(tau: float) -> Ranks:
        ranks: Ranks = {}
        for name, shape in shapes.items():
            k = max(1, int((scores[name] >= tau).sum()))
            ranks[name] = k if k <= max_saving_rank(shape, extra.get(name, 0)) else None
        return ranks

    candidates = tie_groups(torch.cat([s.flatten() for s in scores.values()]).double())
    lo, hi = 0, candidates.numel() - 1
    if params_after(shapes, ranks_at(float("inf")), extra) > target:
        raise CompressorError("the requested ratio cannot be reached even at rank 1 everywhere; use a smaller --ratio")
    if params_after(shapes, ranks_at(float(candidates[hi])), extra) > target:
        return ranks_at(float("inf"))
    while lo < hi:  # smallest candidate threshold that fits
        mid = (lo + hi) // 2
        if params_after(shapes, ranks_at(float(candidates[mid])), extra) <= target:
            hi = mid
        else:
            lo = mid + 1
    return ranks_at(float(candidates[lo]))


def welore(shapes: Shapes, ratio: float, energies: dict[str, torch.Tensor], extra=None) -> Ranks:
    """WeLore's rule: keep components whose min-max normalised singular value reaches one global
    threshold; the threshold is searched so the parameter budget is met (the paper's code uses a
    per-model lookup table and a rank, not parameter, target).
    """
    scores = {}
    for name, e in energies.items():
        s = e.double().clamp_min(0).sqrt()
        span = (s.max() - s.min()).clamp_min(torch.finfo(torch.float64).tiny)
        scores[name] = ((s - s.min()) / span).cpu()
    return _fit_threshold(shapes, scores, _budget(shapes, ratio), extra or {})


def matrix_type(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.#.mlp.up_proj'."""
    return re.sub(r"\.\d+\.", ".#.", name, count=1)


def budget(shapes: Shapes, ratio: float, energies: dict[str, torch.Tensor], extra=None) -> Ranks:
    """Data-driven allocation: within each matrix type (q_proj of every layer, ...), keep the
    components with the largest share of their own matrix's energy, under that type's budget.

    Energies are the method's truncation losses (for whitened methods, the output error each
    component costs on calibration data), so a layer whose output lives in few directions gives up
    rank to one that needs many. Budgets are per type because loss scales are only comparable
    between matrices with the same role; a global pool lets some types starve.
    """
    extra = extra or {}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(matrix_type(name), []).append(name)
    ranks: Ranks = {}
    for members in groups.values():
        sub = {n: shapes[n] for n in members}
        shares = {}
        for n in members:
            e = energies[n].double().clamp_min(0).cpu()
            shares[n] = e / e.sum().clamp_min(torch.finfo(torch.float64).tiny)
        ranks.update(_fit_threshold(sub, shares, _budget(sub, ratio), extra))
    return ranks


POLICIES: dict[str, Callable[..., Ranks]] = {"uniform": uniform, "welore": welore, "budget": budget}


def allocate(policy: str, shapes: Shapes, ratio: float, energies=None, extra=None, align: int = 1) -> Ranks:
    """The policy's ranks, rounded to hardware-friendly multiples (align_ranks) under the same budget."""
    if policy not in POLICIES:
        raise CompressorError(f"unknown allocation '{policy}'; choose one of: {', '.join(sorted(POLICIES))}")
    if policy != "uniform" and energies is None:
        raise CompressorError(f"allocation '{policy}' needs spectra; this is a bug in the method, please report it")
    ranks = POLICIES[policy](shapes, ratio, energies, extra)
    return align_ranks(shapes, ranks, _budget(shapes, ratio), align, extra) if align > 1 else ranks

"""Pick one option per item so that the summed error is smallest and the summed cost fits a budget.

This is the multiple-choice knapsack problem. It is solved exactly by dynamic programming over the
budget, not by a Lagrangian sweep. A Lagrangian (one price per byte, each item taking the option
that minimises error + price x cost) only reaches allocations on the lower convex hull of every
item's error-cost curve. Its last step then leaves part of the budget unspent, or needs a repair
heuristic that is no longer optimal. The DP has neither gap: it is the optimum for the costs it is
given, and it is cheap here (items x options x budget units, vectorised per option).

Costs are counted in units of `unit` bytes (or bits). Each option's cost is rounded up to whole
units and the budget is rounded down, so an allocation the DP accepts can never exceed the true
budget. The unit is chosen so that the budget spans at most MAX_UNITS units. That wastes at most one
unit per item of the budget (about 0.4 KB per item for a 1.5B model at 4 bits), and keeps memory at
items x MAX_UNITS bytes for the back-pointers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from compressor.errors import CompressorError

MAX_UNITS = 1 << 17


def unit_for(budget: int, max_units: int = MAX_UNITS) -> int:
    """The smallest unit that spans `budget` in at most `max_units` steps."""
    return max(1, math.ceil(budget / max_units))


def solve(items: Sequence[Sequence[tuple[int, float]]], budget: int, unit: int | None = None) -> list[int]:
    """Per item, the index of the chosen option.

    unit: the cost step (default and minimum: unit_for(budget)).
    items: per item, its options as (cost, error): an integer cost (bytes or bits) and an error
    >= 0 (float; inf marks an option that must not be taken). The chosen options minimise the summed
    error under sum(cost) <= budget (exactly, for costs rounded up to `unit`; see the module
    docstring). Among equal errors the cheaper allocation wins. Raises CompressorError when even the
    cheapest option of every item does not fit.
    """
    if not items:
        return []
    if any(not opts for opts in items):
        raise CompressorError("every item needs at least one option")
    # Never finer than MAX_UNITS steps over the budget: time and memory grow with the steps.
    unit = max(unit or 1, unit_for(max(budget, 1)))
    cheapest = sum(min(c for c, _ in opts) for opts in items)
    if cheapest > budget:
        raise CompressorError(f"the budget of {budget:,} is below the cheapest allocation, {cheapest:,}")
    units = budget // unit
    # best[s]: the least error of the items so far with at most s units spent (monotone in s).
    best = np.zeros(units + 1)
    choice = np.zeros((len(items), units + 1), dtype=np.int16)
    for i, opts in enumerate(items):
        new = np.full(units + 1, np.inf)
        pick = np.zeros(units + 1, dtype=np.int16)
        for k, (cost, error) in enumerate(opts):
            c = -(-int(cost) // unit)  # rounded up
            if c > units or not math.isfinite(error):
                continue
            candidate = np.full(units + 1, np.inf)
            candidate[c:] = best[: units + 1 - c] + float(error)
            better = candidate < new
            new = np.where(better, candidate, new)
            pick = np.where(better, k, pick)
        best, choice[i] = new, pick
    if not math.isfinite(best[units]):
        raise CompressorError(f"the budget of {budget:,} is below every allowed allocation (cheapest {cheapest:,})")
    # Walk back from the full budget. Taking the smallest budget that reaches the optimal error
    # first spends no more than needed: among allocations of equal error, the cheapest.
    s = int(np.argmax(best <= best[units]))
    picked = []
    for i in range(len(items) - 1, -1, -1):
        k = int(choice[i, s])
        picked.append(k)
        s -= -(-int(items[i][k][0]) // unit)
    return picked[::-1]


def adjacent_widths(uniform_costs: dict[int, int | None], room: int) -> list[int]:
    """The two neighbouring widths a budget mixes (mix: adjacent): the widest whose uniform
    allocation (every linear at it, no adapter; None: some linear cannot take it) costs at most
    `room`, and the next width up. One width when it is the widest; none when none fits."""
    widths = sorted(b for b, c in uniform_costs.items() if c is not None)
    fits = [b for b in widths if uniform_costs[b] <= room]
    if not fits:
        return []
    return [b for b in widths if b >= fits[-1]][:2]

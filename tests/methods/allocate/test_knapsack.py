"""The allocation solver: never over budget, and the optimum where brute force can check it."""

import itertools
import random

import pytest

from compressor.errors import CompressorError
from compressor.methods.allocate import knapsack


def random_problem(rng: random.Random, n_items: int, n_options: int, cost_scale: int = 50):
    items = []
    for _ in range(n_items):
        # Costs grow and errors fall along an item's options, as bits and ranks do, with noise so
        # that the error-cost curve is not convex (where a Lagrangian sweep would miss optima).
        costs = sorted(rng.randint(1, cost_scale) for _ in range(n_options))
        errors = sorted((rng.random() * 10 for _ in range(n_options)), reverse=True)
        items.append(list(zip(costs, errors)))
    return items


def brute_force(items, budget):
    best = None
    for combo in itertools.product(*[range(len(opts)) for opts in items]):
        cost = sum(items[i][k][0] for i, k in enumerate(combo))
        if cost <= budget:
            error = sum(items[i][k][1] for i, k in enumerate(combo))
            if best is None or error < best:
                best = error
    return best


@pytest.mark.parametrize("seed", range(40))
def test_equals_brute_force_on_small_problems(seed):
    rng = random.Random(seed)
    items = random_problem(rng, n_items=rng.randint(1, 5), n_options=rng.randint(1, 4))
    lo = sum(min(c for c, _ in opts) for opts in items)
    hi = sum(max(c for c, _ in opts) for opts in items)
    budget = rng.randint(lo, hi)
    picked = knapsack.solve(items, budget, unit=1)
    cost = sum(items[i][k][0] for i, k in enumerate(picked))
    error = sum(items[i][k][1] for i, k in enumerate(picked))
    assert cost <= budget
    assert error == pytest.approx(brute_force(items, budget), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(200))
def test_never_over_budget_with_coarse_units(seed):
    rng = random.Random(1000 + seed)
    items = random_problem(rng, n_items=rng.randint(1, 60), n_options=rng.randint(1, 8), cost_scale=10**6)
    lo = sum(min(c for c, _ in opts) for opts in items)
    hi = sum(max(c for c, _ in opts) for opts in items)
    slack = len(items) * 10**4  # room for the rounding of each item's cost to the unit
    budget = rng.randint(lo + slack, hi + slack)
    unit = rng.choice([None, 1, 7, 1000, 10**4])
    picked = knapsack.solve(items, budget, unit=unit)
    assert len(picked) == len(items)
    assert sum(items[i][k][0] for i, k in enumerate(picked)) <= budget


def test_rounding_costs_up_keeps_the_budget_even_when_it_gives_up_a_fit():
    # Two items of cost 5 fit the budget 12, but with 4-byte units each rounds up to 8 (2 units of
    # the budget's 3), so the solver takes the cheap option of one of them rather than overspend.
    items = [[(1, 10.0), (5, 0.0)], [(1, 10.0), (5, 0.0)]]
    assert knapsack.solve(items, 12, unit=1) == [1, 1]
    picked = knapsack.solve(items, 12, unit=4)
    assert sum(items[i][k][0] for i, k in enumerate(picked)) <= 12 and sorted(picked) == [0, 1]


def test_equal_errors_take_the_cheaper_allocation():
    items = [[(2, 1.0), (9, 1.0)], [(3, 0.5), (4, 0.5)]]
    assert knapsack.solve(items, 100, unit=1) == [0, 0]


def test_infinite_errors_are_never_chosen():
    items = [[(1, float("inf")), (3, 2.0)], [(1, 1.0)]]
    assert knapsack.solve(items, 4, unit=1) == [1, 0]
    with pytest.raises(CompressorError, match="below every allowed allocation"):
        knapsack.solve(items, 3, unit=1)


def test_a_budget_below_the_cheapest_allocation_is_one_clear_error():
    with pytest.raises(CompressorError, match="below the cheapest allocation, 6"):
        knapsack.solve([[(3, 1.0), (4, 0.0)], [(3, 1.0)]], 5)


def test_units_span_the_budget_in_bounded_steps():
    assert knapsack.unit_for(1000) == 1
    assert knapsack.unit_for(10**9) * knapsack.MAX_UNITS >= 10**9
    assert knapsack.unit_for(10**9, max_units=1000) == 10**6


@pytest.mark.parametrize("room,kept", [(99, []), (100, [3, 4]), (149, [3, 4]), (150, [4, 8]), (299, [4, 8]), (300, [8]), (10**9, [8])])
def test_adjacent_widths_are_the_widest_uniform_that_fits_and_the_next(room, kept):
    from compressor.methods.allocate.knapsack import adjacent_widths
    # 2 bits cannot pack some linear (None): it is neither the lower width nor the next one up
    assert adjacent_widths({2: None, 3: 100, 4: 150, 8: 300}, room) == kept

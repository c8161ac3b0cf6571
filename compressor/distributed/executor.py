"""The executor a run hands its stages (Run.executor): how a stage maps independent work and
combines what each rank holds, without knowing whether there are ranks.

`Executor` is the one-process form: every call is the plain one (fn(items), the input returned).
`RankExecutor` is the distributed form; `executor()` picks the one this process needs. Methods
receive it from the driver and never import this package (tests/test_layout.py checks that).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from compressor.distributed import comm, policy, sharding
from compressor.distributed.state import active, rank, world_size


class Executor:
    """One process: map_by_cost calls fn once on every item; the rest return their input."""

    @property
    def ranks(self) -> int:
        """How many processes share the work (a stage whose work cannot be split may refuse more than one)."""
        return 1

    def map_by_cost(self, fn: Callable[[list], Sequence], items: Sequence, cost: Callable[[object], float],
                    group: Callable[[object], Hashable] | None = None, what: str = "work") -> list:
        """fn(some items) -> one result per item, in order; returns one result per item of `items`.

        Distributed, inside a shared visit, items go to ranks by cost (see RankExecutor); items with
        the same `group` key always go to the same rank in the same call of fn, so work that batches
        by that key (decompositions batch by shape) computes what one call on every item computes."""
        return list(fn(list(items)))

    def shard(self, windows, batch_size: int = 1):
        """This rank's contiguous share of the calibration windows (whole batches where there are enough)."""
        return windows

    def sum_tensors(self, sums: dict, what: str = "statistics") -> dict:
        """{key: partial sum} -> {key: sum over ranks}, added in rank order in float64."""
        return sums

    def sum_counts(self, counts: dict, what: str = "token counts") -> dict:
        """{key: integer count} -> {key: sum over ranks}."""
        return counts

    def merge_layers(self, found: dict, what: str = "spectra") -> dict:
        """A dict a walk filled for the layers this rank visited, merged with every rank's (in a
        layer split each rank visits only its own layers)."""
        return found


def pack_by_cost(costs: dict, first: dict, ranks: int) -> dict:
    """{group: rank}: groups assigned largest cost first (ties: the group whose first item comes
    first) to the least-loaded rank (ties: the lowest rank), an LPT bin-packing."""
    load, owner = [0.0] * ranks, {}
    for key in sorted(costs, key=lambda k: (-costs[k], first[k])):
        r = min(range(ranks), key=lambda k: (load[k], k))
        owner[key], load[r] = r, load[r] + costs[key]
    return owner


class RankExecutor(Executor):
    @property
    def ranks(self) -> int:
        return world_size()


    """Several ranks. In a shared visit (policy.py: every rank is at the same layer), map_by_cost
    packs the item groups over the ranks by cost (pack_by_cost), each rank calls fn on its own
    items, and the owners broadcast their results (moved to the host for pickling), so every rank
    gets the same bits. Outside one (a layer split: each rank at its own layer) it is the plain call."""

    def map_by_cost(self, fn, items, cost, group=None, what="work") -> list:
        items = list(items)
        if not policy.shared_visit():
            return list(fn(items))
        groups: dict = {}
        for i, item in enumerate(items):
            groups.setdefault(group(item) if group is not None else i, []).append(i)
        owner = pack_by_cost({k: sum(cost(items[i]) for i in idx) for k, idx in groups.items()}, {k: idx[0] for k, idx in groups.items()},
                             world_size())
        mine = sorted(i for k, idx in groups.items() if owner[k] == rank() for i in idx)
        done = {i: _to_host(res) for i, res in zip(mine, fn([items[i] for i in mine]))} if mine else {}
        results: dict = {}
        for r in sorted(set(owner.values())):
            results.update(comm.broadcast_object(done if r == rank() else None, r, f"{what} of rank {r}"))
        return [results[i] for i in range(len(items))]

    def shard(self, windows, batch_size: int = 1):
        return sharding.share(windows, batch_size)

    def sum_tensors(self, sums: dict, what: str = "statistics") -> dict:
        return comm.reduce_in_order(sums, what)

    def sum_counts(self, counts: dict, what: str = "token counts") -> dict:
        return comm.reduce_counts(counts, what)

    def merge_layers(self, found: dict, what: str = "spectra") -> dict:
        return policy.merge_layer_split(found, what)


def executor() -> Executor:
    """The executor for this process: RankExecutor once a process group of several ranks is up."""
    return RankExecutor() if active() else Executor()


def _to_host(value):
    """Tensors and modules inside dicts / lists / tuples moved to the host (for pickling between ranks)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu()
    if hasattr(value, "parameters") and hasattr(value, "cpu"):  # an nn.Module: moved in place
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    return value

"""Which calibration windows and evaluation items each rank takes: contiguous shares, whole batches
where there are enough, so every rank runs exactly the batches one process would run."""

from __future__ import annotations

from compressor.distributed.comm import all_gather_objects
from compressor.distributed.state import active, rank, world_size
from compressor.errors import CompressorError


def span(n: int, parts: int, index: int, align: int = 1, allow_empty: bool = False) -> tuple[int, int]:
    """The contiguous [lo, hi) of items 0..n-1 that part `index` of `parts` takes.

    align: items come in blocks of `align` (calibration batches): when there are at least `parts`
    blocks, whole blocks are split, so every rank runs exactly the batches one process would run.
    Otherwise items are split one by one."""
    blocks = -(-n // align) if align > 1 else n
    if align > 1 and blocks >= parts:
        lo, hi = blocks * index // parts * align, blocks * (index + 1) // parts * align
        return min(lo, n), min(hi, n)
    if n < parts and not allow_empty:
        raise CompressorError(f"{n} calibration windows cannot be split over {parts} ranks; use --samples {parts} or more, or fewer processes")
    return n * index // parts, n * (index + 1) // parts


def share(windows, batch_size: int = 1):
    """This rank's contiguous share of the calibration windows (all of them in one process)."""
    if windows is None or not active():
        return windows
    lo, hi = span(windows.shape[0], world_size(), rank(), batch_size)
    return windows[lo:hi]


def item_span(n: int, batch_size: int = 1) -> tuple[int, int]:
    """[lo, hi) of n evaluation items (windows, problems) for this rank; may be empty."""
    if not active():
        return 0, n
    return span(n, world_size(), rank(), batch_size, allow_empty=True)


def gather_list(items: list, what: str = "results") -> list:
    """Every rank's list, concatenated in rank order (so in item order for item_span shares)."""
    if not active():
        return items
    return [x for part in all_gather_objects(items, what) for x in part]

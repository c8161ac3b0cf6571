"""Collectives between the ranks: barriers, objects, statistics summed in rank order, modules.

Every function returns its input at once in one process (no process group of more than one rank),
so callers need not branch. Objects and barriers go over gloo; tensors over the default group
(NCCL for CUDA tensors). A peer that dies turns the backend's error into one RankFailure line.
"""

from __future__ import annotations

import datetime

from compressor.distributed.state import RankFailure, active, collective, group, rank, timeout_seconds, world_size

_GATHERED = 1 << 22  # float64 elements one all_gather of reduce_in_order brings in, over all ranks (32 MiB)


def barrier(what: str = "barrier", timeout: float | None = None) -> None:
    """Wait until every rank gets here, at most `timeout` seconds (default: COMPRESSOR_DIST_TIMEOUT);
    a rank that does not arrive in time is named in the error."""
    if not active():
        return
    import torch.distributed as dist

    span = datetime.timedelta(seconds=timeout_seconds(timeout))
    collective(what, lambda: dist.monitored_barrier(group=group.control, timeout=span, wait_all_ranks=True))


def all_gather_objects(obj, what: str = "exchange") -> list:
    """Every rank's `obj`, in rank order (pickled, over gloo)."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    collective(what, lambda: dist.all_gather_object(out, obj, group=group.control))
    return out


def broadcast_object(obj, src: int = 0, what: str = "broadcast"):
    """Rank `src`'s `obj` on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    collective(what, lambda: dist.broadcast_object_list(box, src=src, group=group.control))
    return box[0]


def _sum_in_rank_order(t, what: str):
    """sum over ranks of `t`, added as ((t_0 + t_1) + t_2) + ... in float64 on every rank; in
    chunks of 32 MiB / world_size per rank, so the memory it takes does not grow with the ranks."""
    import torch
    import torch.distributed as dist

    flat = t.detach().reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.float64, device=t.device)
    n = world_size()
    chunk = max(1 << 12, _GATHERED // n)
    for start in range(0, flat.numel(), chunk):
        piece = flat[start : start + chunk].to(torch.float64).contiguous()
        parts = [torch.empty_like(piece) for _ in range(n)]
        collective(what, lambda: dist.all_gather(parts, piece))
        acc = parts[0].clone()
        for p in parts[1:]:
            acc += p
        out[start : start + piece.numel()] = acc
    return out.view(t.shape).to(t.dtype)


def reduce_in_order(tensors: dict, what: str = "statistics") -> dict:
    """{key: sum over ranks} for a dict of partial sums that every rank holds with the same keys and
    shapes; each added in rank order in float64 (then cast back to its dtype)."""
    if not active():
        return tensors
    keys = sorted(tensors)
    layout = [(k, tuple(tensors[k].shape), str(tensors[k].dtype)) for k in keys]
    layouts = all_gather_objects(layout, what)
    if any(other != layout for other in layouts):
        raise RankFailure(f"rank {rank()}: the ranks collected different {what} ({layouts[0][:3]} ... vs {layout[:3]} ...); "
                          "every rank must run the same model and recipe")
    return {k: _sum_in_rank_order(tensors[k], what) for k in keys}


def reduce_counts(counts: dict, what: str = "token counts") -> dict:
    """{key: sum over ranks} of integer counts (exact)."""
    if not active():
        return counts
    every = all_gather_objects(sorted(counts.items()), what)
    if any([k for k, _ in c] != sorted(counts) for c in every):
        raise RankFailure(f"rank {rank()}: the ranks counted different {what}; every rank must run the same model and recipe")
    return {k: sum(dict(c)[k] for c in every) for k in counts}


def reduce_collector(collector) -> None:
    """A GramCollector's / DriftCollector's partial sums and counts, replaced by their sums over
    the ranks (then grams() and crosses() are the whole calibration set's)."""
    if not active():
        return
    collector.sums = reduce_in_order(collector.sums, "Gram sums")
    collector.counts = reduce_counts(collector.counts)
    if getattr(collector, "cross_sums", None):
        collector.cross_sums = reduce_in_order(collector.cross_sums, "cross-Gram sums")


def broadcast_module(module, src: int = 0, what: str = "layer broadcast") -> None:
    """Overwrite every rank's parameters and buffers of `module` with rank `src`'s, in place (the
    modules must have the same structure: the same recipe ran on the same model)."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    tensors = [*module.named_parameters(), *module.named_buffers()]
    layout = [(n, tuple(t.shape), str(t.dtype)) for n, t in tensors]
    if any(other != layout for other in all_gather_objects(layout, what)):
        raise RankFailure(f"rank {rank()}: the ranks compressed a layer into different shapes; "
                          "they must run the same model and recipe on the same kind of device")
    with torch.no_grad():
        for _, t in tensors:
            data = t.detach()
            buf = data if data.is_contiguous() else data.contiguous()
            collective(what, lambda: dist.broadcast(buf, src=src))
            if buf is not data:
                data.copy_(buf)
    # Modules that keep something derived from their tensors (QuantLinear's dequantised weight)
    # say so with tensors_changed(): what they kept is stale now.
    for m in module.modules():
        changed = getattr(m, "tensors_changed", None)
        if callable(changed):
            changed()

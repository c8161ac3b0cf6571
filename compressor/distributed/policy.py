"""How the layer walk is shared out over the ranks (the words the rest of the package uses):

* window split (walks with calibration data): every rank visits every layer with its share of the
  windows (sharding.py), the statistics are reduced (comm.py), and after each visit the ranks
  compare the layer's fingerprint; should they differ (non-deterministic GPU kernels, mixed
  hardware), rank 0's layer is broadcast to the others (`synced`), so the next layer's inputs
  always come from the layer rank 0 will write. Such a visit is a *shared visit*: every rank is at
  the same layer, so the work inside it can be mapped over the ranks (executor.py).
* layer split (data-free walks, inside `layer_split(True)`): rank r visits layers r, r + N, ...
  (`layer_turn`); what a walk found per layer is merged afterwards (`merge_layer_split`), and the
  compressed modules and their specs are handed round layer by layer (`gather_specs`).

`fault_hook`, None in production, lets tests make a rank fail at a given layer (tests/rank_entry.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable

from compressor.distributed.comm import all_gather_objects, broadcast_module, broadcast_object
from compressor.distributed.state import active, group, rank, world_size

log = logging.getLogger("compressor.distributed")

# Called as fault_hook(layer_index) on every rank each time the walk reaches a decoder layer in a
# distributed run; tests install one that raises or exits to check how a failing rank ends the run.
fault_hook: Callable[[int], None] | None = None


class _Walk:
    split = False  # inside layer_split(True): data-free walks split their layers over the ranks
    split_used = False  # some compression of this process split its layers (for the report)
    repairs = 0  # layers whose copies differed between ranks and were broadcast from rank 0


_walk = _Walk()


def describe() -> dict:
    """The report's "distributed" entry; {} in one process, so a one-process report is unchanged."""
    if not active():
        return {}
    return {"distributed": {"world_size": world_size(), "backend": group.backend,
                            "split": "layers" if _walk.split_used else "calibration windows",
                            "layers_repaired_from_rank_0": _walk.repairs}}


# ----------------------------------------------------------------------------- window split


def fingerprint(module) -> str:
    """A digest of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        data = t.detach().reshape(-1)
        if data.numel():
            h.update(data.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def synced(visit: Callable) -> Callable:
    """visit(i, layer, ...) followed by the ranks' check that they hold the same layer; where they
    do not, rank 0's is broadcast (see the module docstring)."""

    def visit_and_sync(i, layer, *args, **kwargs):
        visit(i, layer, *args, **kwargs)
        prints = all_gather_objects(fingerprint(layer), f"layer {i} check")
        if len(set(prints)) > 1:
            _walk.repairs += 1
            log.warning("layer %d: the ranks' compressed copies differ (%d distinct); rank 0's is broadcast", i, len(set(prints)))
            broadcast_module(layer, 0, f"layer {i} broadcast")

    return visit_and_sync


def shared_visit() -> bool:
    """Whether every rank is visiting the current layer (a window split), so the work of the visit
    can be mapped over them; False in one process and in a layer split."""
    return active() and not _walk.split


# ----------------------------------------------------------------------------- layer split


@contextlib.contextmanager
def layer_split(enabled: bool):
    """Within the block, walks without calibration data visit only this rank's layers (r, r + N,
    ...); gather_specs then shares the results. No effect in one process."""
    previous = _walk.split
    _walk.split = bool(enabled) and active()
    _walk.repairs = 0
    _walk.split_used = _walk.split  # for this compression's report
    try:
        yield
    finally:
        _walk.split = previous


def in_layer_split() -> bool:
    """Whether data-free walks now visit this rank's layers only."""
    return _walk.split and active()


def layer_turn(index: int, split: bool) -> bool:
    """Whether this rank visits decoder layer `index` (always, unless the walk is split)."""
    if fault_hook is not None:
        fault_hook(index)
    return not split or index % world_size() == rank()


def merge_layer_split(found: dict, what: str = "spectra") -> dict:
    """A dict that a split walk filled for this rank's layers only, merged over the ranks (in rank
    order; the keys, full module names, are disjoint). Unchanged outside a layer split."""
    if not in_layer_split():
        return found
    merged: dict = {}
    for part in all_gather_objects(found, what):
        merged.update(part)
    return merged


def gather_specs(model, found: dict, sync: bool = False) -> None:
    """After a recipe ran on every rank: in a layer split, each layer's owner broadcasts its
    compressed modules and their specs, one layer at a time (so the extra memory is one layer's),
    and every rank installs them, the specs merged in layer order as one process records them.
    Otherwise, with `sync`, every rank's model is made rank 0's (for the evaluation that follows).
    `found`: full linear name -> spec, this rank's, replaced by every rank's. No-op in one process."""
    if not active():
        return
    from compressor import models  # here, not on top: the CLI imports this package before torch

    if not in_layer_split():
        if sync:
            prints = all_gather_objects(fingerprint(model), "model check")
            if len(set(prints)) > 1:
                broadcast_module(model, 0, "model broadcast")
        return
    mine, specs = dict(found), {}
    for i in range(len(models.decoder_layers(model))):
        prefix, owner = models.layer_prefix(model, i) + ".", i % world_size()
        payload = {full: (spec, model.get_submodule(full)) for full, spec in mine.items() if full.startswith(prefix)} if owner == rank() else None
        payload = broadcast_object(payload, owner, f"layer {i}'s compressed modules")
        for full, (spec, module) in payload.items():
            specs[full] = spec
            if owner != rank():
                model.set_submodule(full, module)
    # A split walk is data-free, so no stage holds adapters or other per-rank state to merge.
    for others in all_gather_objects({f: s for f, s in mine.items() if f not in specs}, "specs"):  # outside the layers (none so far), in rank order
        specs.update(others)
    found.clear()
    found.update(specs)

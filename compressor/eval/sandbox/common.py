"""What a sandboxed run reports (`Outcome`) and the constants the host side and the runner share."""

from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("passed", "failed", "timeout", "error")

# Runner exit codes (runner.py; anything else non-zero counts as a failure of the program).
EXIT_PASSED = 0
EXIT_SETUP = 4
EXIT_TIMEOUT = 5  # the runner's own wall-clock timer ran out
EXIT_CANCELLED = 6  # the evaluator asked it to stop (SIGTERM)
GRACE = 2.0  # seconds past the timeout before the evaluator kills the process group itself

DETAIL_CHARS = 2000  # of output kept in Outcome.detail (the tail)
OUTPUT_CHARS = 1 << 20  # per stream; the child drops the rest of its stdout/stderr

NOBODY = 65534  # uid and gid the program runs as when the evaluator is root

# Defaults of the per-program limits (run_program / run_many options; see docs/guides/sandbox.md).
MAX_FILE_MB = 16  # RLIMIT_FSIZE: one file, and the captured output
DISK_MB = 64  # all the program writes in its folder together
MAX_INODES = 4096  # files, folders and links it may create there

# What `isolation()` can report (Linux); see the package docstring and docs/guides/sandbox.md.
MECHANISMS = ("uid", "userns", "mntns", "pidns", "netns", "ipcns", "noprivs", "landlock", "landlock-net", "landlock-scope", "quota")


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # one of STATUSES
    detail: str = ""  # why, plus the tail of the program's output (truncated)
    seconds: float = 0.0  # wall time of the child process

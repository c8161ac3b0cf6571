"""`--nproc N`: run N ranks of a command on this machine and supervise them.

The ranks are `python -m compressor WORDS` with the environment torchrun would give them
(localhost rendezvous on a free port); rank 0's stdout and stderr pass through, the others' error
lines are kept for the verdict. One failure stops them all and is raised as one line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from compressor.distributed.state import LOST, RankFailure

# What each rank runs after the interpreter. Tests point it at their own entry (tests/rank_entry.py),
# which installs a fault hook before it runs the CLI.
RANK_COMMAND: tuple[str, ...] = ("-m", "compressor")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


GRACE = 10.0  # seconds the other ranks get to stop on their own after one failed
KILL_AFTER = 30.0  # seconds after SIGTERM (rank 0 removes its temporary folder) before SIGKILL


class _Rank:
    def __init__(self, index: int, proc: subprocess.Popen, forward: bool):
        self.index, self.proc, self.forward = index, proc, forward
        self.error: str | None = None  # its last "error: ..." line
        self.exited_at: float | None = None
        self.stopped = False  # terminated by the launcher
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            if line.startswith("error: "):
                self.error = line[len("error: "):].strip()
            elif self.forward:
                sys.stderr.write(line)
                sys.stderr.flush()


def launch(words: list[str], nproc: int) -> None:
    """Run `python -m compressor WORDS` (RANK_COMMAND) as ranks 0..nproc-1 on this machine (localhost rendezvous
    on a free port) and supervise them: rank 0's stdout and stderr pass through; when a rank fails,
    the others get GRACE seconds to stop, then SIGTERM, then SIGKILL, and the first failure is
    raised as one line (RankFailure, with that rank's exit code)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1"}
    # Like torchrun, but sharing the cores out instead of one thread each.
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // nproc)))
    ranks: list[_Rank] = []
    try:
        for r in range(nproc):
            proc = subprocess.Popen([sys.executable, *RANK_COMMAND, *words], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                    stdin=subprocess.DEVNULL, stdout=None if r == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, errors="replace", bufsize=1)
            ranks.append(_Rank(r, proc, forward=r == 0))
        _supervise(ranks)
    finally:
        _stop(ranks)
    _verdict(ranks)


def _supervise(ranks: list[_Rank]) -> None:
    failed_at = stopped_at = None
    while True:
        now = time.monotonic()
        for r in ranks:
            if r.exited_at is None and r.proc.poll() is not None:
                r.exited_at = now
        if all(r.exited_at is not None for r in ranks):
            return
        if failed_at is None and any(r.proc.returncode not in (None, 0) for r in ranks):
            failed_at = now
        if failed_at is not None and stopped_at is None and now - failed_at > GRACE:
            stopped_at = now
            for r in ranks:
                if r.proc.poll() is None:
                    r.stopped = True
                    r.proc.send_signal(signal.SIGTERM)
        if stopped_at is not None and now - stopped_at > KILL_AFTER:
            for r in ranks:
                if r.proc.poll() is None:
                    r.proc.kill()
        time.sleep(0.05)


def _stop(ranks: list[_Rank]) -> None:
    """Whatever ended the launcher (Ctrl-C, SIGTERM, an error): no rank outlives it."""
    running = [r for r in ranks if r.proc.poll() is None]
    for r in running:
        r.stopped = True
        r.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + KILL_AFTER
    for r in running:
        try:
            r.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()
    for r in ranks:
        r.reader.join(timeout=5)


def _verdict(ranks: list[_Rank]) -> None:
    failed = [r for r in ranks if r.proc.returncode != 0]
    if not failed:
        return
    # The first failure that is not a consequence of another (a lost peer, the launcher's SIGTERM).
    order = sorted(failed, key=lambda r: (r.stopped, r.error is not None and LOST in r.error, r.exited_at or 0.0, r.index))
    culprit = order[0]
    code = culprit.proc.returncode
    if culprit.error is not None:
        what = culprit.error
    elif code < 0:
        what = f"killed by {signal.Signals(-code).name}"
    else:
        what = f"exited with code {code} and no message"
    same = culprit.error is not None and all(r.error == culprit.error for r in failed) and len(failed) == len(ranks)
    message = what if same else f"rank {culprit.index} of {len(ranks)}: {what}; all ranks stopped"
    failure = RankFailure(message)
    failure.exit_code = code if 0 < code < 256 else 1
    raise failure

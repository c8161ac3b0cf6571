"""Which isolation layers work on this machine: probed once per process, with one warning for
what is missing (see docs/guides/sandbox.md)."""

from __future__ import annotations

import logging
import os
import sys
import threading

from compressor.eval.sandbox.common import DISK_MB, MAX_FILE_MB, MAX_INODES
from compressor.eval.sandbox.launch import launch

logger = logging.getLogger("compressor.eval.sandbox")

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
    return frozenset({"mntns", "pidns", "netns", "ipcns", "noprivs", "landlock", "landlock-net", "quota",
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
        # A tmpfs of bounded size and inodes over the working folder; without it only each file's
        # size is capped while the program runs, and the total is checked after it.
        "disk and inode quota": "quota" in got,
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
        out = launch(_PROBE_SOURCE, 30.0, 1024, MAX_FILE_MB, site_packages, want, disk_mb=DISK_MB, max_inodes=MAX_INODES, strict=False, probe=True)
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

"""Removing a program's working folder, whatever the program left in it.

A program may leave a folder chain thousands deep (too deep for a recursive walk, and too long a
path for path-based calls), folders it made unreadable or unwritable, and tens of thousands of
files. `remove_tree` walks with an explicit stack, one open folder at a time and names relative
to it, so neither depth nor path length matters, and it never raises: a run must end with an
Outcome, not an exception from its cleanup.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

logger = logging.getLogger("compressor.eval.sandbox")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Usage:
    """What a folder held: bytes of its files on disk (allocated blocks) and inodes (files, folders,
    links), the folder itself excluded; `removed` once it is gone."""

    bytes: int = 0
    inodes: int = 0
    removed: bool = False


def remove_tree(path: str) -> Usage:
    """Delete the folder `path` and everything below it; returns what it held. Never raises: a
    failure is logged and the folder stays."""
    usage = Usage()
    try:
        _remove(path, usage)
        usage.removed = True
    except BaseException as e:  # also MemoryError, or a KeyboardInterrupt mid-way
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            # Finish the removal first (it is quick), then let the interrupt through.
            try:
                _remove(path, usage)
            except Exception:
                pass
            raise
        logger.warning("sandbox: could not remove %s (%s: %s); remove it by hand", path, type(e).__name__, e)
    return usage


def _open_dir(name: str, parent: int | None) -> int:
    """Open a folder the program may have closed to us (mode 000) and make it ours to list and
    empty. The entry was seen as a folder by lstat, and nothing of the program runs any more."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except PermissionError:
        os.chmod(name, stat.S_IRWXU, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    try:
        os.fchmod(fd, stat.S_IRWXU)  # so that its entries can be removed
    except OSError:
        pass
    return fd


def _remove(path: str, usage: Usage) -> None:
    if not os.path.lexists(path):
        return
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        os.unlink(path)
        return
    # stack: one (name in parent, (st_dev, st_ino), names left) per open level; only the deepest
    # folder is open (fd). Going up uses "..", checked against the identity recorded on the way
    # down, so a folder moved in the meantime cannot lead the removal outside `path`.
    fd = _open_dir(path, None)
    top = os.fstat(fd)
    stack = [(path, (top.st_dev, top.st_ino), os.listdir(fd))]
    try:
        while stack:
            name, ident, names = stack[-1]
            if names:
                entry = names.pop()
                st = os.lstat(entry, dir_fd=fd)
                usage.inodes += 1
                if stat.S_ISDIR(st.st_mode):
                    child = _open_dir(entry, fd)
                    os.close(fd)
                    fd = child
                    mine = os.fstat(fd)
                    stack.append((entry, (mine.st_dev, mine.st_ino), os.listdir(fd)))
                else:
                    # Allocated blocks, as a tmpfs quota counts them (a sparse file costs little).
                    usage.bytes += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
                    os.unlink(entry, dir_fd=fd)
                continue
            stack.pop()
            if not stack:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != stack[-1][1]:
                raise OSError(f"{name!r} was moved during the removal")
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)

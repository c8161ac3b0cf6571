"""Who owns an output: one run at a time writes an -o (docs/reference/errors.md, class 2).

A run takes an exclusive lock on `.OUT.lock` beside its output before it touches the output, its
temporary copies or a streamed run's `.OUT.partial`, and holds it until it returns. A second run
into the same -o is refused at once (with the holder's pid), so two runs can no longer both exit 0
with one result silently lost, and `--stream --overwrite` can no longer delete the partial folder of
a run that is still going. The lock is an fcntl lock: the kernel drops it when its process dies, so
the lock of a killed run is taken over by the next run, never a reason to refuse it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import os
from pathlib import Path

from compressor.errors import CompressorError

_HELD: dict[Path, list] = {}  # lock path -> [fd, depth]: a process may nest (compress -> compress_streaming)


def lock_path(out: str | Path) -> Path:
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.lock")


def claim(out: str | Path) -> None:
    """Take the lock of output `out` (again, if this process holds it); CompressorError if a live
    run holds it."""
    path = lock_path(out)
    if path in _HELD:
        _HELD[path][1] += 1
        return
    if not path.parent.is_dir():
        return  # the output's folder does not exist yet, so no other run can be writing there
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return  # an unwritable place: the output checks that follow say so
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise CompressorError(f"another run (pid {holder}) is writing -o {Path(out)} right now; "
                                  "wait for it to finish or choose another -o") from None
        except OSError:
            os.close(fd)
            return  # a file system without locks: nothing to enforce with
        # The holder before us may have removed the file after we opened it: then we locked an
        # orphan, and must lock the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[path] = [fd, 1]


def release(out: str | Path) -> None:
    path = lock_path(out)
    held = _HELD.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[path]
    try:
        path.unlink(missing_ok=True)  # while still locked, so no one else's lock file is removed
    finally:
        os.close(held[0])


def owns_output(function):
    """Decorator: `function` (whose `out` argument names an output folder or file) holds the lock
    of `out` while it runs. Ranks of a distributed run other than rank 0 write nothing and skip it."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        out = signature.bind_partial(*args, **kwargs).arguments.get("out")
        if out is None or int(os.environ.get("RANK") or 0) != 0:
            return function(*args, **kwargs)
        claim(out)
        try:
            return function(*args, **kwargs)
        finally:
            release(out)

    return wrapper


def source_identity(folder: str | Path) -> dict:
    """What a checkpoint folder holds, cheaply: per weight file its size, modification time and a
    hash of its safetensors header (names, shapes, offsets) and of its first and last MiB of data,
    plus a hash of the index and config. A resumed run compares it with the run it continues, so
    weights replaced at the same path (same shapes, even) are noticed instead of mixed in."""
    folder = Path(folder)
    found = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not path.name.endswith((".safetensors", ".bin", ".json")) or path.name.startswith("."):
            continue
        digest = hashlib.sha256()
        info = path.stat()
        with open(path, "rb") as f:
            if path.suffix == ".json":
                digest.update(f.read(1 << 20))
            else:
                head = f.read(8)
                digest.update(head)
                if path.suffix == ".safetensors" and len(head) == 8:
                    digest.update(f.read(min(int.from_bytes(head, "little"), 100 << 20)))
                digest.update(f.read(1 << 20))
                if info.st_size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    digest.update(f.read(1 << 20))
        found[path.name] = {"bytes": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": digest.hexdigest()}
    return found

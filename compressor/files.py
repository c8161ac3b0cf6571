"""Writing files and folders so that nothing half-written is ever seen, and refusing, before any
work, an output that cannot be written. Every output of the toolkit goes through here."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from compressor.errors import CompressorError, EnvironmentFault, Interrupted, environment_fault

TMP_MARK = ".tmp-"  # temporary siblings of an output folder are named .OUT.tmp-PID-XXXX


def check_output_folder(out: str | Path, overwrite: bool = False, source: str | Path | None = None) -> None:
    """Refuse, before any work, an output folder that cannot or must not be written: an existing
    one without --overwrite, a file, the source model (or a folder holding it), an unwritable place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressorError(f"-o {out} is a file, not a folder; --overwrite replaces only an output folder, so delete it or choose another -o")
    if source is not None and Path(source).exists():
        src, dst = Path(source).resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise CompressorError(f"-o {out} is the source model{' folder' if src == dst else ' or holds it'}; "
                                  "writing there would replace the source, so choose another -o")
    if out.exists() and not overwrite:
        raise CompressorError(f"output folder {out} already exists; pass --overwrite or choose another -o")
    check_writable(out, "-o")


def remove_stale_temps(out: str | Path) -> list[Path]:
    """Delete the temporary siblings of `out` that a killed run (SIGKILL, power loss) left; those of
    a process still running are kept. Returns what was removed."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.glob(f".{glob.escape(out.name)}{TMP_MARK}*"):
        pid = path.name[len(out.name) + 1 + len(TMP_MARK):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; it replaces `out` only if the block finishes.

    Whatever ends the block early (an error, a full disk, SIGTERM turned into errors.Interrupted by
    the CLI) removes the temporary folder; a disk or permission fault becomes an EnvironmentFault.
    Temporaries a SIGKILL left behind are removed by the next run (remove_stale_temps)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressorError(f"-o {out} is a file; delete it or choose another -o")
    if out.exists() and not overwrite:
        raise CompressorError(f"output folder {out} already exists; pass --overwrite or choose another -o")
    tmp = old = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{os.getpid()}-", dir=out.parent))
        # mkdtemp makes a private (0700) folder; the output gets what mkdir would give it.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        yield tmp
        if out.exists():
            # Moved aside, not deleted first: a crash in between leaves the old output, not none.
            old = out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}-old")
            out.rename(old)
        tmp.rename(out)
    except Interrupted as exc:
        exc.hint = exc.hint or f"{out} was not written and its temporary copy was removed; run the command again"
        raise
    except CompressorError:
        raise
    except Exception as exc:
        fault = environment_fault(exc, f"writing {out}")
        if fault is None:
            raise
        raise fault from exc
    finally:
        if old is not None and old.exists() and not out.exists():
            old.rename(out)  # the new output did not land: keep the old one
        for path in (tmp, old):
            if path is not None and path.exists():
                shutil.rmtree(path, ignore_errors=True)


def check_writable(path: str | Path, what: str) -> None:
    """Refuse, before any work, a path that cannot be written: the nearest folder that exists above
    it must be a writable folder (missing folders in between are created when writing)."""
    path = Path(path)
    probe = path.parent if str(path.parent) else Path(".")
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CompressorError(f"{what} {path}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        reason = "the file system is read-only" if read_only else "permission denied"
        raise EnvironmentFault(f"cannot write {what} {path}: {reason} in {probe}; fix its permissions or choose another path")


def check_output_file(path: str | Path, what: str = "-o") -> None:
    """An output file (eval -o, compare -o) checked before evaluating, so results are not lost."""
    path = Path(path)
    if path.is_dir():
        raise CompressorError(f"{what} {path} is a folder; give a file name, e.g. {path / 'results.json'}")
    check_writable(path, what)


def check_output_dir(path: str | Path, what: str) -> None:
    """An output folder (analyze --plots) checked before the model loads."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CompressorError(f"{what} {path} is a file; give a folder (it is created if missing)")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise EnvironmentFault(f"cannot write {what} {path}: permission denied; fix its permissions or choose another folder")
        return
    check_writable(path, what)


def write_atomic(path: str | Path, content: str | Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Write `content` (text, or a function writing to the path it gets) via a temporary sibling,
    so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(content)
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def public_mode(path) -> None:
    """The permissions a plain open() would have given (mkstemp makes files private to the owner)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_json(path: str | Path, data) -> Path:
    return write_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")

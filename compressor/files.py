"""Writing files and folders so that nothing half-written is ever seen, and refusing, before any
work, an output that cannot be written. Every output of the toolkit goes through here."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from compressor.errors import CompressorError, EnvironmentFault, Interrupted, environment_fault

TMP_MARK = ".tmp-"  # temporary siblings of an output folder are named .OUT.tmp-PID-XXXX
# Bytes the longest temporary sibling adds to an output's name (".OUT.tmp-PID-XXXXXXXX" for a
# folder, ".OUT.XXXXXXXX.safetensors.tmp" for a file): a name within this of the file system's
# limit passes open() but fails when its temporary copy is made, after the whole run.
NAME_MARGIN = 32

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a regular file"))


def kind_of(path: str | Path) -> str:
    """What a path is, in words ("a character device", "a FIFO (named pipe)", ...), following links."""
    mode = os.stat(path).st_mode
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def output_target(path: str | Path, what: str = "-o", folder: bool = False) -> Path:
    """Where an output really lands; the rule every writer here applies (docs/reference/errors.md, class 1):
    only regular files and folders are written or replaced. A symbolic link is followed and its
    target written (the link is kept); a dangling link, and anything that is not a regular file (a
    device such as /dev/null, a FIFO, a socket), is refused, because replacing it would destroy
    something that is not ours. The path is made absolute, so `-o .` names a real folder."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.exists():
            raise CompressorError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                                  "remove the link or choose another path")
        path = target
    if path.exists():
        kind = kind_of(path)
        wanted = "a folder" if folder else "a regular file"
        if kind not in ("a folder", "a regular file"):
            raise CompressorError(f"{what} {path} is {kind}, not {wanted}; compressor writes only regular files and folders, "
                                  "so choose another path (or leave out the option to write nothing)")
    return path


def input_file(path: str | Path, what: str) -> Path:
    """An input file to read: refused unless it is a regular file or folder, so that a FIFO or a
    device (which would block or never end) costs an error, not a hung run."""
    path = Path(path)
    if path.exists() and kind_of(path) not in ("a folder", "a regular file"):
        raise CompressorError(f"{what} {path} is {kind_of(path)}, not a regular file; compressor reads only regular files and folders, "
                              "so copy the data into a file")
    return path


def check_output_folder(out: str | Path, overwrite: bool = False, source: str | Path | None = None) -> None:
    """Refuse, before any work, an output folder that cannot or must not be written: an existing
    one without --overwrite, a file, the source model (or a folder holding it), an unwritable place."""
    shown = out
    out = output_target(out, "-o", folder=True)
    if out.exists() and not out.is_dir():
        raise CompressorError(f"-o {shown} is a file, not a folder; --overwrite replaces only an output folder, so delete it or choose another -o")
    here = Path.cwd().resolve()
    if out == here or out in here.parents:
        raise CompressorError(f"-o {shown} is the current folder{'' if out == here else ' or holds it'}; "
                              "an output folder is replaced as a whole, so name a new folder such as ./compressed")
    if out.exists() and overwrite and os.path.ismount(out):
        raise CompressorError(f"-o {shown} is a mount point, which --overwrite cannot replace; choose a folder inside it")
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
    out = output_target(out, "-o", folder=True)
    if out.exists() and not out.is_dir():
        raise CompressorError(f"-o {out} is a file; delete it or choose another -o")
    if out.exists() and not overwrite:
        raise CompressorError(f"output folder {out} already exists; pass --overwrite or choose another -o")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{os.getpid()}-", dir=out.parent))
        # mkdtemp makes a private (0700) folder; the output gets what mkdir would give it.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        yield tmp
        land(tmp, out, overwrite)
    except Interrupted as exc:
        if landed(tmp, out):  # the signal came after the rename: OUT is there, complete
            exc.hint = f"{out} was written completely before the interruption; nothing else was left behind"
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
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class HeldSignals:
    """SIGTERM and SIGINT noted by Python handlers from now on, and delivered by `release` through
    the handlers they replaced. Python handlers that note, not a signal mask: the kernel hands a
    process's signal to any thread that does not mask it (torch and tokenizers start threads).
    Outside the main thread nothing is held (only it may change handlers, and only it receives
    Python's signals); an ignored signal stays ignored."""

    def __init__(self) -> None:
        import signal
        import threading

        self.caught: list[int] = []
        self.previous: dict = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(s) not in (signal.SIG_IGN, None):
                self.previous[s] = signal.signal(s, lambda signum, frame: self.caught.append(signum))

    def release(self, default_exits: bool = False) -> None:
        """Restore the handlers, then deliver the first noted signal: a Python handler is called
        (Ctrl-C's KeyboardInterrupt, the CLI's Interrupted); the default action ends the process,
        or with `default_exits` raises SystemExit(128 + N) so the caller's clean-up runs first."""
        import signal

        previous, self.previous = self.previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)
        if not self.caught:
            return
        signum = self.caught[0]
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            if default_exits:
                raise SystemExit(128 + signum)
            signal.raise_signal(signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT held back for the block and handled when it ends, so a step such as the
    final rename and its clean-up is done whole and the message that follows tells the truth."""
    held = HeldSignals()
    try:
        yield
    finally:
        held.release()


def landed(tmp: Path | None, out: Path) -> bool:
    """Whether land(tmp, out) has happened: a signal held back during it is delivered as it ends, so
    the handler of the interruption asks this to say what was written."""
    return tmp is not None and not tmp.exists() and out.exists()


def land(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the finished folder `tmp` in place of `out`, signals held back. An
    existing `out` is moved aside first, not deleted (a crash in between leaves the old output, not
    none), and only with `overwrite`: an `out` that appeared while this run worked is another's."""
    with signals_deferred():
        if out.exists() and not overwrite:
            raise CompressorError(f"output folder {out} appeared while this run was working (another run wrote it); "
                                  "it was left as it is, so rerun with another -o or with --overwrite")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}-old")
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)  # the new output did not land: keep the old one
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_writable(path: str | Path, what: str) -> None:
    """Refuse, before any work, a path that cannot be written: the nearest folder that exists above
    it must be a writable folder (missing folders in between are created when writing), the name
    must leave room for its temporary sibling, and a file must really be creatable there (a probe
    file, at once removed: /proc, /sys and odd file systems pass every permission check and then
    refuse files, after the whole run)."""
    path = Path(os.path.abspath(path))
    probe = path.parent
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
    try:
        limit = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(path.name))
    if size + NAME_MARGIN > limit:
        raise CompressorError(f"{what} {path}: its name is {size} bytes, and with the {NAME_MARGIN} its temporary copy adds it passes "
                              f"the file system's limit of {limit}; use a name of at most {limit - NAME_MARGIN} bytes")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".compressor-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        fault = environment_fault(exc, f"cannot write {what} {path}")
        if fault is not None:
            raise fault from None
        raise CompressorError(f"cannot write {what} {path}: {probe} does not take new files ({exc.strerror}); "
                              "choose a path on an ordinary disk") from None


def check_output_file(path: str | Path, what: str = "-o") -> None:
    """An output file (eval -o, compare -o) checked before evaluating, so results are not lost."""
    path = output_target(path, what)
    if path.is_dir():
        raise CompressorError(f"{what} {path} is a folder; give a file name, e.g. {path / 'results.json'}")
    check_writable(path, what)


def check_output_dir(path: str | Path, what: str) -> None:
    """An output folder (analyze --plots) checked before the model loads."""
    path = output_target(path, what, folder=True)
    if path.exists() and not path.is_dir():
        raise CompressorError(f"{what} {path} is a file; give a folder (it is created if missing)")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise EnvironmentFault(f"cannot write {what} {path}: permission denied; fix its permissions or choose another folder")
        return
    check_writable(path, what)


def write_atomic(path: str | Path, content: str | Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Write `content` (text, or a function writing to the path it gets) via a temporary sibling,
    so a reader never sees half a file. Only a regular file is written or replaced (output_target)."""
    path = output_target(path)
    if path.is_dir():
        raise CompressorError(f"-o {path} is a folder; give a file name, e.g. {path / 'results.json'}")
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
    if type(value).__name__ == "Tensor" and hasattr(value, "tolist"):  # torch is not imported for this check
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")

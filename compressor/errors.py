"""The exceptions users see: a message that names the problem and the fix.

Exit codes of the CLI (docs/reference/errors.md lists every case):
  0  success
  1  internal error (a bug): one line, the traceback with `compressor -v ...`
  2  bad input (CompressorError): a model, recipe, option or path the user can fix
  3  environment fault (EnvironmentFault): disk full, permission denied, read-only file system
  130 / 143  interrupted by SIGINT / SIGTERM (Interrupted)
"""

from __future__ import annotations

import errno
import os
import re
import reprlib
import signal


class CompressorError(Exception):
    """Bad input. The CLI prints the message on one line and exits with code 2."""

    exit_code = 2


class EnvironmentFault(CompressorError):
    """The machine, not the input: no space left, no permission, a read-only file system. Exit code 3."""

    exit_code = 3


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, like KeyboardInterrupt, so that `except Exception`
    does not swallow it while every `finally` (temporary folders) still runs. `hint` tells the user
    what was kept and how to continue."""

    def __init__(self, signum: int, hint: str | None = None):
        super().__init__(signum)
        self.signum = signum
        self.hint = hint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return f"interrupted by {name}; " + (self.hint or "nothing was written")


# errno values that mean "the environment", with the fix to suggest.
_FAULTS = {
    errno.ENOSPC: "free some disk space or choose an -o on another disk",
    errno.EDQUOT: "free some of your disk quota or choose an -o on another disk",
    errno.EFBIG: "the file system or a ulimit caps the file size; choose an -o on another disk",
    errno.EACCES: "fix the permissions or choose another path",
    errno.EPERM: "fix the permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose a writable path",
    errno.EIO: "the disk reported an I/O error; check it and retry",
}


def environment_fault(exc: BaseException, doing: str) -> EnvironmentFault | None:
    """An EnvironmentFault for an error the machine caused (None for any other error): an OSError
    with one of those errno values, or a library error that wraps one, as safetensors does
    ("I/O error: No space left on device (os error 28)"). doing: what was under way."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    fix = _FAULTS.get(code)
    if fix is None:
        return None
    what = os.strerror(code)
    filename = getattr(exc, "filename", None)
    where = f" ({filename})" if filename and str(filename) not in doing else ""
    return EnvironmentFault(f"{doing}: {what}{where}; {fix}")


# A value the user gave, for a message: bounded in length and in the work it takes, since a recipe's
# value can be huge (a YAML alias bomb expands to 10^9 items; its repr never ends). Every user value
# in a message goes through here, never through repr().
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 80
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = _SHOW.maxset = 6
_SHOW.maxlevel = 3


def shown(value) -> str:
    return _SHOW.repr(value)


# Range checks for the recipe configs' __post_init__: each names the key, the range and the value.
# recipe.from_dict prefixes the file and the stage.

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Upper bounds of recipe numbers (class 3 of docs/reference/errors.md: every number has one, checked before
# any work, so a typo such as `samples: 1000000000` costs an error, not the machine's memory).
# Counts the model or the machine bound more tightly (a rank against a matrix, samples against
# memory) are checked again where the model is known.
MAX_COUNT = 1 << 20  # ranks, windows, window lengths: beyond any model or machine of today
MAX_DAMP = 1e3  # relative dampings and ridges (times the mean of a Gram's diagonal)


def check_int(key: str, value, least: int, optional: bool = False, most: int = MAX_COUNT) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value < least:
        raise CompressorError(f"key '{key}' must be an integer >= {least}{' or null' if optional else ''}, got {shown(value)}")
    if value > most:
        raise CompressorError(f"key '{key}' must be an integer <= {most}, got {shown(value)}")


def check_float(key: str, value, low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
                most: float | None = None) -> None:
    """`value` in the range [low, high] (open ends as asked); `most`: an upper cap checked after,
    with a message of its own (a key whose range has no natural upper end still has a bound)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # NaN fails
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        span = (f"in {lo}, {hi}" if low is not None and high is not None
                else (f">{'' if low_open else '='} {low}" if low is not None else f"<{'' if high_open else '='} {high}"))
        raise CompressorError(f"key '{key}' must be a number {span}, got {shown(value)}")
    if most is not None and value > most:
        raise CompressorError(f"key '{key}' must be a number <= {most}, got {shown(value)}")


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise CompressorError(f"key '{key}' must be one of {', '.join(map(str, choices))}; got {shown(value)}")


def check_patterns(key: str, value) -> None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise CompressorError(f"key '{key}' must be a non-empty list of glob patterns such as ['*'] or ['mlp.*'], got {shown(value)}")


_LEAST = {"samples": 1, "seq_len": 2, "eval_limit": 1, "eval_seq_len": 2}


def check_counts(**counts) -> None:
    """Option counts against their real ranges (None: not given, the recipe's value applies)."""
    for name, value in counts.items():
        least = _LEAST[name]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise CompressorError(f"--{name.replace('_', '-')} must be an integer >= {least}, got {shown(value)} (leave it out to use the recipe's value)")
        if value is not None and value > MAX_COUNT:
            raise CompressorError(f"--{name.replace('_', '-')} must be an integer <= {MAX_COUNT}, got {shown(value)}")

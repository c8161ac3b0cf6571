"""What a run may ask of the machine: every count a user gives (recipe keys, options) has a static
upper bound (errors.MAX_COUNT and the click ranges), and the counts whose cost grows with the
model, the calibration windows, are checked against the memory this machine has, before any work
(docs/reference/errors.md, class 3). A typo such as `--samples 1000000000` then costs one error line."""

from __future__ import annotations

from pathlib import Path

from compressor.errors import CompressorError
from compressor.hf import read_config_json

# Characters of calibration text read per calibration token needed: far above what any tokenizer
# averages (code and prose give 3-5 characters per token), so the windows are the same as if the
# whole file had been read, while a 30 MB file given for 256 tokens is not read or tokenised whole.
CHARS_PER_TOKEN = 64
# ... and never less than this: a text shorter than it is tokenised whole, as it always was, so
# the windows of small calibration budgets (tests, quick runs) do not change with this bound.
MIN_TEXT_CHARS = 1 << 20


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB"


def check_memory(what: str, need: int, fix: str) -> None:
    """Refuse a request that cannot fit in this machine's available memory."""
    have = available_memory()
    if have is not None and need > have:
        raise CompressorError(f"{what} needs about {_gb(need)} of memory, more than the {_gb(have)} available; {fix}")


def check_calibration(samples: int, seq_len: int, hidden: int | None = None) -> None:
    """The calibration windows (int64 token ids) and, when the model's width is known, the
    activations the driver keeps for them (a float32 input and output per window and layer)."""
    per_token = 16 + (8 * hidden if hidden else 0)
    check_memory(f"calibration with {samples} windows of {seq_len} tokens", samples * seq_len * per_token,
                 "use fewer --samples or a shorter --seq-len")


def text_budget(samples: int, seq_len: int) -> int:
    """Characters of calibration text worth reading for `samples` windows of `seq_len` tokens."""
    if samples < 1 or seq_len < 1:
        raise CompressorError(f"calibration needs at least one window of at least one token, got {samples} x {seq_len}")
    return max(CHARS_PER_TOKEN * 4 * samples * seq_len, MIN_TEXT_CHARS)


def model_width(model) -> int | None:
    """The hidden size of a loaded model or of a folder's config.json, without loading weights;
    None when unknown (GGUF files, hub ids, a damaged config that loading reports)."""
    config = getattr(model, "config", None)
    if config is not None:
        config = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    elif isinstance(model, (str, Path)) and (Path(model) / "config.json").is_file():
        try:
            config = read_config_json(model)
        except CompressorError:
            return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for c in (config, text):
        for key in ("hidden_size", "n_embd", "d_model"):
            if isinstance(c.get(key), int) and not isinstance(c.get(key), bool) and c[key] > 0:
                return c[key]
    return None


def check_run(model, recipe, samples: int | None, seq_len: int | None) -> None:
    """Before any work: the calibration a run asks for fits this machine (api.preflight)."""
    if recipe.needs_calibration:
        cal = recipe.calibration
        check_calibration(cal.samples if samples is None else samples, cal.seq_len if seq_len is None else seq_len, model_width(model))

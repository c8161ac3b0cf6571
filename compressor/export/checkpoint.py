"""Writing and reading compressed checkpoints.

A compressed folder is an ordinary Hugging Face checkpoint (config.json, safetensors, tokenizer)
whose config also records what was done (`compression`) and points `auto_map` at a generated
`modeling_compressed.py`. That file is compressor/modules.py verbatim plus two lines naming the
original model class, so plain transformers loads the result with trust_remote_code=True and
`compressor.load` loads it without remote code, both from the same module definitions.

Two standard formats ride along where they apply:
- a model whose stages declare a `quantization_config` is also a checkpoint of that format (quantised layers hold
  qweight/qzeros/scales/g_idx; config.json `quantization_config` and quantize_config.json), which
  its loaders (transformers + gptqmodel, vLLM) read without our code;
- compensation adapters are a PEFT LoRA folder, `adapter/`, with scale 1 (lora_alpha = r)
  (peft.py).
What each method adds to config.json comes from its `export` (compressor/methods/base.py).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from compressor import hf, modules, progress
from compressor.errors import CompressorError, shown
from compressor.export.peft import ADAPTER_DIR, adapted, attach_adapter, save_adapter, without_adapters
from compressor.files import atomic_dir
from compressor.models import guard_token_ids

SHIM_NAME = "modeling_compressed"
FORMAT_VERSION = 1


def check_finite_tensors(model) -> None:
    """Refuse to write a model with a NaN or Inf anywhere (embedding and head included): an
    output that loads but computes garbage is worse than none."""
    seen = set()
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        if not torch.isfinite(t).all():
            raise CompressorError(f"tensor {name} holds NaN or Inf values, so the output would be broken; nothing was written "
                                  "(check the source checkpoint, or use --dtype float32 if a 16-bit dtype overflowed)")




def check_compression(compression, where) -> None:
    """The `compression` section of a config.json, checked before anything is built from it: a
    hand-edited or damaged one (a negative or string rank, an unknown module type, `modules` as a
    list, 7 bits) is one CompressorError naming the key, not a raw exception from deep inside
    (the module specs by modules.ModuleSpec.from_json, which the loading shim runs too)."""
    def fail(key, wanted, value):
        raise CompressorError(f"{where}/config.json: compression{key} must be {wanted}, got {shown(value)}; "
                              "the section was edited or damaged, so re-export the model")

    if not isinstance(compression, dict):
        fail("", "a mapping", compression)
    try:
        modules.specs_from_json(compression.get("modules"))
    except ValueError as e:
        raise CompressorError(f"{where}/config.json: {e}; the compression section was edited or damaged, so re-export the model") from None
    adapter = compression.get("adapter")
    if adapter is not None and (not isinstance(adapter, dict) or not isinstance(adapter.get("path"), (str, type(None)))):
        fail("['adapter']", "a mapping whose path is a folder name or null", adapter)


def shim_source(base_class_name: str) -> str:
    source = Path(modules.__file__).read_text()
    return f"{source}\n\nfrom transformers import {base_class_name}  # noqa: E402\n\nCompressedForCausalLM = compressed_class({base_class_name})\n"


def base_class(config) -> type:
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise CompressorError(f"no causal-LM class for model_type '{config.model_type}' in this transformers version") from None


@dataclass
class Declaration:
    """What an export declares besides the weights: set on model.config by `declare`."""

    standard: bool  # plain layers only: a standard checkpoint of the original class, no shim
    quant: dict | None  # a quantization_config to declare (what a quantisation stage's `export` gave)
    peft_adapters: dict  # full name -> LoraAdapted whose float adapters go to out/adapter


def declare(model, module_specs: dict, record: dict, extra: dict | None = None) -> Declaration:
    """Set model.config.compression (and auto_map unless the result is a standard checkpoint).

    extra: what the recipe's stages add (Method.export): "quantization_config", a quantisation format's config
    to declare for quantised-only models; "adapter_required", the base is no model without its
    adapter. Adapters wrapped around compressed layers (modules.LoraAdapted) go to `out/adapter`.
    """
    extra = extra or {}
    quant = extra.get("quantization_config")
    peft_adapters = adapted(model, peft_only=True)
    compression = {"format_version": FORMAT_VERSION, **record, "modules": modules.specs_to_json(module_specs)}
    if peft_adapters:
        compression["adapter"] = {"path": ADAPTER_DIR, "format": "peft-lora", "ranks": {n: m.lora_A.out_features for n, m in peft_adapters.items()},
                                  "required": bool(extra.get("adapter_required"))}
    elif any(spec.adapter is not None for spec in module_specs.values()):
        compression["adapter"] = {"path": None, "format": "quantized-in-checkpoint",
                                  "ranks": {n: spec.adapter["rank"] for n, spec in module_specs.items() if spec.adapter is not None}}
    model.config.compression = compression
    # Nothing but plain layers (e.g. narrower MLPs, the same width in every layer): a standard
    # checkpoint of the original class, loaded with no remote code.
    standard = not module_specs and not peft_adapters and quant is None
    if not standard:
        model.config.auto_map = {"AutoModelForCausalLM": f"{SHIM_NAME}.CompressedForCausalLM"}
    return Declaration(standard, quant, peft_adapters)


def write_declared(folder: Path, model, declared: Declaration, tokenizer, report: dict, write_weights) -> None:
    """Everything of an export into `folder`: `write_weights(folder)` writes the weights and
    config.json (save_pretrained, or the streamed shards and their index), with the quantisation
    config declared and float adapters unwrapped; then the quantisation config, the adapter folder, the
    tokenizer, the shim and the report."""
    quant = declared.quant
    with without_adapters(model, declared.peft_adapters):
        if quant is not None:
            model.config.quantization_config = quant
        try:
            write_weights(folder)
        finally:
            if quant is not None:
                del model.config.quantization_config
    if quant is not None:
        (folder / "quantize_config.json").write_text(json.dumps(quant, indent=2) + "\n")
    if declared.peft_adapters:
        save_adapter(declared.peft_adapters, folder / ADAPTER_DIR)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if not declared.standard:
        (folder / f"{SHIM_NAME}.py").write_text(shim_source(base_class(model.config).__name__))
    (folder / "compression_report.json").write_text(json.dumps(report, indent=2) + "\n")


@progress.timed_call("export")
def save(model, tokenizer, out: str | Path, module_specs: dict, record: dict, report: dict, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write the compressed model (in memory) to `out` atomically; `record` goes into config.compression."""
    check_finite_tensors(model)
    base_class(model.config)
    declared = declare(model, module_specs, record, extra)
    with atomic_dir(out, overwrite) as tmp:
        write_declared(tmp, model, declared, tokenizer, report, model.save_pretrained)
    return Path(out)


def load(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu", adapter: bool = True):
    """Load any folder this toolkit wrote (or an ordinary checkpoint) without remote code.

    adapter: apply the folder's PEFT adapter (`adapter/`), as the compression left the model;
    False gives the base alone, e.g. to put the adapter on with peft itself. Quantised adapters are
    part of the checkpoint and always load."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CompressorError(f"{path} is not a model folder (no config.json); pass the -o folder of `compressor compress`")
    if isinstance(dtype, str) and dtype not in ("float32", "bfloat16", "float16", "float64"):
        raise CompressorError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    hf.read_config_json(path)  # a damaged config.json: one error
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - whatever transformers makes of a damaged config, it is bad input
        raise CompressorError(f"{path}/config.json: transformers cannot read this config ({type(e).__name__}: {hf.first_line(e)}); "
                              "re-export the model") from None
    if getattr(config, "compression", None) is None:
        model = hf.from_pretrained(AutoModelForCausalLM, path, path, dtype=dtype)
    else:
        check_compression(config.compression, path)
        # Our modules read quantised tensors themselves; transformers' quantizer would demand gptqmodel.
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        try:
            cls = modules.compressed_class(base_class(config))
        except (KeyError, ValueError, TypeError) as e:
            raise CompressorError(f"{path}/config.json: no model class for this config ({type(e).__name__}: {hf.first_line(e)})") from None
        model = hf.from_pretrained(cls, path, path, config=config, dtype=dtype)
        found = config.compression.get("adapter") or {}
        if adapter and found.get("path"):
            attach_adapter(model, path / found["path"])
        elif found.get("required"):
            warnings.warn(f"{path}: the base was fitted together with its adapter and gives nonsense alone; load with adapter=True", stacklevel=2)
    guard_token_ids(model)
    return model.to(device).eval()

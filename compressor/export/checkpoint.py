"""Writing and reading compressed checkpoints.

A compressed folder is an ordinary Hugging Face checkpoint (config.json, safetensors, tokenizer)
whose config also records what was done (`compression`) and points `auto_map` at a generated
`modeling_compressed.py`. That file is compressor/modules.py verbatim plus two lines naming the
original model class, so plain transformers loads the result with trust_remote_code=True and
`compressor.load` loads it without remote code, both from the same module definitions.

Two standard formats ride along where they apply:
- a model whose only compression is GPTQ is also a GPTQ v1 checkpoint (quantised layers hold
  qweight/qzeros/scales/g_idx; config.json `quantization_config` and quantize_config.json), which
  GPTQ loaders (transformers + gptqmodel, vLLM) read without our code;
- compensation adapters are a PEFT LoRA folder, `adapter/`, with scale 1 (lora_alpha = r)
  (peft.py).
What each method adds to config.json comes from its `export` (compressor/methods/base.py).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from compressor import modules, progress
from compressor.errors import CompressorError
from compressor.export.peft import ADAPTER_DIR, adapted, attach_adapter, save_adapter, without_adapters
from compressor.files import atomic_dir

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


def shim_source(base_class_name: str) -> str:
    source = Path(modules.__file__).read_text()
    return f"{source}\n\nfrom transformers import {base_class_name}  # noqa: E402\n\nCompressedForCausalLM = compressed_class({base_class_name})\n"


def base_class(config) -> type:
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise CompressorError(f"no causal-LM class for model_type '{config.model_type}' in this transformers version") from None


@progress.timed_call("export")
def save(model, tokenizer, out: str | Path, module_specs: dict, record: dict, report: dict, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write the compressed model to `out` atomically; `record` goes into config.compression.

    extra: what the recipe's methods add (Method.export): "quantization_config", a GPTQ v1 config
    to declare for GPTQ-only models; "adapter_required", the base is no model without its adapter.
    Adapters wrapped around compressed layers (modules.LoraAdapted) go to `out/adapter`.
    """
    extra = extra or {}
    quant = extra.get("quantization_config")
    check_finite_tensors(model)
    base = base_class(model.config)
    peft_adapters = adapted(model, peft_only=True)
    compression = {"format_version": FORMAT_VERSION, **record, "modules": module_specs}
    if peft_adapters:
        compression["adapter"] = {"path": ADAPTER_DIR, "format": "peft-lora", "ranks": {n: m.lora_A.out_features for n, m in peft_adapters.items()},
                                  "required": bool(extra.get("adapter_required"))}
    elif any("adapter" in spec for spec in module_specs.values()):
        compression["adapter"] = {"path": None, "format": "quantized-in-checkpoint",
                                  "ranks": {n: spec["adapter"]["rank"] for n, spec in module_specs.items() if "adapter" in spec}}
    model.config.compression = compression
    # Nothing but plain layers (e.g. structured widths, the same in every layer): a standard
    # checkpoint of the original class, loaded with no remote code.
    standard = not module_specs and not peft_adapters and quant is None
    if not standard:
        model.config.auto_map = {"AutoModelForCausalLM": f"{SHIM_NAME}.CompressedForCausalLM"}
    with atomic_dir(out, overwrite) as tmp, without_adapters(model, peft_adapters):
        if quant is not None:
            model.config.quantization_config = quant
        try:
            model.save_pretrained(tmp)
        finally:
            if quant is not None:
                del model.config.quantization_config
        if quant is not None:
            (tmp / "quantize_config.json").write_text(json.dumps(quant, indent=2) + "\n")
        if peft_adapters:
            save_adapter(peft_adapters, tmp / ADAPTER_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not standard:
            (tmp / f"{SHIM_NAME}.py").write_text(shim_source(base.__name__))
        (tmp / "compression_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return Path(out)


def load(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu", adapter: bool = True):
    """Load any folder this toolkit wrote (or an ordinary checkpoint) without remote code.

    adapter: apply the folder's PEFT adapter (`adapter/`), as the compression left the model;
    False gives the base alone, e.g. to put the adapter on with peft itself. Quantised adapters are
    part of the checkpoint and always load."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CompressorError(f"{path} is not a model folder (no config.json); pass the -o folder of `compressor compress`")
    config = AutoConfig.from_pretrained(path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if getattr(config, "compression", None) is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    # Our modules read GPTQ tensors themselves; transformers' GPTQ path would demand gptqmodel.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    cls = modules.compressed_class(base_class(config))
    model = cls.from_pretrained(path, config=config, dtype=dtype)
    found = config.compression.get("adapter") or {}
    if adapter and found.get("path"):
        attach_adapter(model, path / found["path"])
    elif found.get("required"):
        warnings.warn(f"{path}: the base was quantised to go with its adapter (eora refine) and gives nonsense alone; load with adapter=True", stacklevel=2)
    return model.to(device).eval()

"""Compensation adapters as a PEFT LoRA folder (`adapter/` beside the checkpoint), with scale 1
(lora_alpha = r), so `PeftModel.from_pretrained` puts them on the base; and reading them back
without peft."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compressor import modules
from compressor.errors import CompressorError

ADAPTER_DIR = "adapter"


def adapted(model, peft_only: bool = False) -> dict:
    """Name -> LoraAdapted; peft_only: just those with float adapters (quantised ones stay in the
    checkpoint)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, modules.LoraAdapted) and not (peft_only and isinstance(m.lora_A, modules.QuantLinear))}


@contextlib.contextmanager
def without_adapters(model, adapted: dict):
    """The model with each adapted layer replaced by its base, restored afterwards."""
    for name, wrapper in adapted.items():
        model.set_submodule(name, wrapper.base)
    try:
        yield
    finally:
        for name, wrapper in adapted.items():
            model.set_submodule(name, wrapper)


def save_adapter(adapted: dict, folder: Path) -> None:
    """A PEFT LoRA folder: y = base(x) + lora_B(lora_A(x)), scale lora_alpha / r = 1 everywhere."""
    ranks = {name: m.lora_A.out_features for name, m in adapted.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    # Full module names as targets, so no layer the adapter does not cover is wrapped; peft reads
    # rank_pattern keys as regexes, hence the escaping. alpha_pattern keeps every scale at 1.
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": None,
        "revision": None,
    }
    tensors = {}
    for name, m in adapted.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def attach_adapter(model, folder: Path) -> None:
    """Wrap each layer a PEFT LoRA folder written by save_adapter targets (scale 1) in LoraAdapted:
    the same arithmetic as peft, without peft, and the model keeps its own class."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise CompressorError(f"cannot read the adapter in {folder} ({e}); pass adapter=False to load the base alone") from None
    if config.get("lora_alpha") != config.get("r") or config.get("alpha_pattern") != config.get("rank_pattern"):
        raise CompressorError(f"{folder} is not a scale-1 adapter as compressor writes them; load the base with adapter=False and apply it with peft")
    for name in config["target_modules"]:
        A, B = (tensors[f"base_model.model.{name}.lora_{k}.weight"] for k in "AB")
        base = model.get_submodule(name)
        like = next(base.parameters(), None)
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
        model.set_submodule(name, modules.LoraAdapted.from_factors(base, B, A, dtype=dtype))

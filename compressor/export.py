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
- compensation adapters are a PEFT LoRA folder, `adapter/`, with scale 1 (lora_alpha = r).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import compressor
from compressor import models, modules
from compressor.errors import CompressorError

SHIM_NAME = "modeling_compressed"
FORMAT_VERSION = 1
ADAPTER_DIR = "adapter"


TMP_MARK = ".tmp-"  # temporary siblings of an output folder are named .OUT.tmp-PID-XXXX


def check_output_folder(out: str | Path, overwrite: bool = False, source: str | Path | None = None) -> None:
    """Refuse, before any work, an output folder that cannot or must not be written: an existing
    one without --overwrite, a file, the source model (or a folder holding it), an unwritable place."""
    from compressor.evaluate import check_writable

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressorError(f"-o {out} is a file, not a folder; --overwrite replaces only an output folder, so delete it or choose another -o")
    if source is not None and Path(source).exists():
        src, dst = Path(source).resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise CompressorError(f"-o {out} is the source model{' folder' if src == dst else ' or holds it'}; writing there would replace the source, so choose another -o")
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
    from compressor.errors import Interrupted, environment_fault

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


def check_finite_tensors(model) -> None:
    """Refuse to write a model with a NaN or Inf anywhere (embedding and head included): an
    output that loads but computes garbage is worse than none."""
    seen = set()
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        if not torch.isfinite(t).all():
            raise CompressorError(f"tensor {name} holds NaN or Inf values, so the output would be broken; nothing was written (check the source checkpoint, or use --dtype float32 if a 16-bit dtype overflowed)")


def weight_bytes(folder: Path) -> int:
    """Bytes of a model folder's weights: its safetensors files, adapters included."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))


def shim_source(base_class_name: str) -> str:
    source = Path(modules.__file__).read_text()
    return f"{source}\n\nfrom transformers import {base_class_name}  # noqa: E402\n\nCompressedForCausalLM = compressed_class({base_class_name})\n"


def base_class(config) -> type:
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise CompressorError(f"no causal-LM class for model_type '{config.model_type}' in this transformers version") from None


def save(model, tokenizer, out: str | Path, module_specs: dict, record: dict, report: dict, overwrite: bool = False, quant: dict | None = None) -> Path:
    """Write the compressed model to `out` atomically; `record` goes into config.compression.

    quant: a GPTQ quantization_config (see gptq_format) to declare, for GPTQ-only models.
    Adapters wrapped around compressed layers (modules.LoraAdapted) go to `out/adapter`.
    """
    check_finite_tensors(model)
    base = base_class(model.config)
    adapted = _adapted(model, peft_only=True)
    compression = {"format_version": FORMAT_VERSION, **record, "modules": module_specs}
    if adapted:
        compression["adapter"] = {"path": ADAPTER_DIR, "format": "peft-lora", "ranks": {n: m.lora_A.out_features for n, m in adapted.items()}}
        # eora refine quantised W - B A: the base is then no model without its adapter
        compression["adapter"]["required"] = any(st.get("refine") for st in (record.get("recipe") or {}).get("stages", []))
    elif any("adapter" in spec for spec in module_specs.values()):
        compression["adapter"] = {"path": None, "format": "quantized-in-checkpoint", "ranks": {n: spec["adapter"]["rank"] for n, spec in module_specs.items() if "adapter" in spec}}
    model.config.compression = compression
    # Nothing but plain layers (e.g. structured widths, the same in every layer): a standard
    # checkpoint of the original class, loaded with no remote code.
    standard = not module_specs and not adapted and quant is None
    if not standard:
        model.config.auto_map = {"AutoModelForCausalLM": f"{SHIM_NAME}.CompressedForCausalLM"}
    with atomic_dir(out, overwrite) as tmp, _without_adapters(model, adapted):
        if quant is not None:
            model.config.quantization_config = quant
        try:
            model.save_pretrained(tmp)
        finally:
            if quant is not None:
                del model.config.quantization_config
        if quant is not None:
            (tmp / "quantize_config.json").write_text(json.dumps(quant, indent=2) + "\n")
        if adapted:
            save_adapter(adapted, tmp / ADAPTER_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not standard:
            (tmp / f"{SHIM_NAME}.py").write_text(shim_source(base.__name__))
        (tmp / "compression_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return Path(out)


def _adapted(model, peft_only: bool = False) -> dict:
    """Name -> LoraAdapted; peft_only: just those with float adapters (quantised ones stay in the
    checkpoint)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, modules.LoraAdapted) and not (peft_only and isinstance(m.lora_A, modules.QuantLinear))}


@contextlib.contextmanager
def _without_adapters(model, adapted: dict):
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
    from safetensors.torch import save_file

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


def gptq_format(model, recipe, specs: dict) -> dict | None:
    """The GPTQ v1 quantization_config when GPTQ (or RTN on its grid) is the only compression.

    Low-rank models are not declared GPTQ: a GPTQ loader would look for dense layers that are not
    there. Decoder linears left unquantised are excluded with gptqmodel's `dynamic` negative rules.
    """
    quant = next((s for s in recipe.stages if s.kind == "quant"), None)
    if quant is None or not all(_gptq_only(spec) for spec in specs.values()):
        return None
    skipped = [name for name, _, _ in models.iter_linears_any(model) if name not in specs]
    fmt = quant.format()
    return {
        **fmt,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "format": "gptq",
        "pack_dtype": "int32",
        "damp_percent": quant.config.damp,
        "static_groups": quant.config.static_groups,
        "true_sequential": False,
        "dynamic": {f"-:^{re.escape(name)}$": {} for name in skipped},
        "meta": {"quantizer": [f"compressor:{compressor.__version__}"], "method": quant.name},
    }


def _gptq_only(spec: dict) -> bool:
    """A quantised dense layer, stored under its own name (no in-checkpoint adapter around it)."""
    return spec["type"] == "quant" and "adapter" not in spec


def stored_bits(module) -> float:
    """Bits a decoder linear occupies in the checkpoint (quantised codes with their scales, zeros,
    g_idx); float adapters go to the PEFT folder, quantised ones count."""
    if isinstance(module, modules.LoraAdapted):
        kept = isinstance(module.lora_A, modules.QuantLinear)
        return stored_bits(module.base) + (stored_bits(module.lora_A) + stored_bits(module.lora_B) if kept else 0)
    if isinstance(module, modules.QuantLinear):
        return sum(t.numel() * t.element_size() * 8 for t in module.buffers())
    if isinstance(module, modules.LowRankLinear) or not list(module.children()):
        own = sum(t.numel() * t.element_size() * 8 for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])
        return own + sum(stored_bits(c) for c in module.children())
    return sum(t.numel() * t.element_size() * 8 for t in module.parameters())


def quant_report(model, recipe, outcome) -> dict:
    """report entries: quantisation grid and effective bits per weight; adapters."""
    from compressor.quant import effective_bits

    report: dict = {}
    quant = next((s for s in recipe.stages if s.kind == "quant"), None)
    linears = list(models.iter_linears_any(model))
    dense_weights = sum(math.prod(models.linear_shape(m)) for _, _, m in linears)
    bits = sum(stored_bits(m) for _, _, m in linears)
    if quant is not None:
        c = quant.config
        bases = [m.base if isinstance(m, modules.LoraAdapted) else m for _, _, m in linears]
        qlayers = [q for m in bases for q in m.modules() if isinstance(q, modules.QuantLinear)]
        report["quantization"] = {
            "method": quant.name,
            **quant.format(),
            "act_order": c.act_order,
            "static_groups": c.static_groups,
            "damp": c.damp,
            # Per quantised weight, as GPTQ papers count it (codes + fp16 scale and zero per group).
            "effective_bits": None if not qlayers else sum(effective_bits(c.bits, c.group_size, q.in_features, q.out_features) * q.in_features * q.out_features for q in qlayers) / sum(q.in_features * q.out_features for q in qlayers),
            "gptq_checkpoint": all(_gptq_only(spec) for spec in outcome.specs.values()),
        }
    # Everything the decoder linears store (biases and low-rank factors included), per weight of
    # the dense model: the number that compares rank reduction, quantisation and both.
    report["bits_per_dense_weight"] = bits / dense_weights
    if outcome.adapters or outcome.merged:
        adapted = _adapted(model)
        stage = next(s for s in recipe.stages if s.kind == "adapter")
        quantized = bool(adapted) and not _adapted(model, peft_only=True)
        report["adapters"] = {
            "method": stage.name,
            "merged": bool(outcome.merged),
            "ranks": outcome.merged or outcome.adapters,
            "params": sum(m.lora_A.in_features * m.lora_A.out_features + m.lora_B.in_features * m.lora_B.out_features for m in adapted.values()),
            "bits": stage.config.bits if quantized else None,
            "path": None if outcome.merged or quantized else ADAPTER_DIR,
            # Squared output error on the calibration data, per module: how much of it rank r removes.
            "error_removed": {n: round(v, 4) for n, v in outcome.removed.items()},
            "error_removed_mean": round(sum(outcome.removed.values()) / len(outcome.removed), 4) if outcome.removed else None,
        }
    return report


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


def attach_adapter(model, folder: Path) -> None:
    """Wrap each layer a PEFT LoRA folder written by save_adapter targets (scale 1) in LoraAdapted:
    the same arithmetic as peft, without peft, and the model keeps its own class."""
    from safetensors.torch import load_file

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

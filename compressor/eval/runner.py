"""Evaluating a model by spec: load it (anything compressor wrote, a folder, a .gguf, 'demo', a hub
id), run the tasks (tasks.py), and record what was evaluated, how, and the model's size on disk."""

from __future__ import annotations

import time
from pathlib import Path

from transformers import AutoTokenizer

from compressor import models
from compressor.environment import resolve_device, versions
from compressor.errors import CompressorError
from compressor.eval.tasks import check_tasks, run_tasks
from compressor.export import checkpoint
from compressor.loading import check_checkpoint, load_model, resolve_model
from compressor.modules import LoraAdapted

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def load_any(model: str, dtype: str = "float32", device: str = "cpu", adapter: bool = True):
    """A folder written by compressor (or any HF folder) via export.checkpoint.load, with its PEFT adapter
    unless adapter=False; else the loader's specs."""
    path = Path(model)
    if (path / "config.json").is_file():
        check_checkpoint(path)  # T5, no weights, truncated or incomplete checkpoints: one clear error
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise CompressorError(f"{path} has no usable tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                  "save one beside the model") from None
        return checkpoint.load(path, dtype=dtype, device=device, adapter=adapter), tokenizer
    loaded, tokenizer = load_model(model, dtype=dtype)
    return loaded.to(device).eval(), tokenizer


def disk_bytes(model: str) -> int | None:
    """Bytes of weight files behind a model spec (a folder's weights, a .gguf, a built-in's folder)."""
    path = Path(model).expanduser()
    if not path.exists():
        try:
            source = resolve_model(model)
        except CompressorError:
            return None
        if source.kind == "hub":
            return None
        path = Path(source.location)
    if path.is_file():
        return path.stat().st_size
    # Adapters (PEFT folders) sit in sub-folders and count towards what a user ships.
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def model_info(model, spec: str | None) -> dict:
    config = getattr(model, "config", None)
    compression = getattr(config, "compression", None)
    summary = None
    if isinstance(compression, dict):
        summary = {k: compression.get(k) for k in ("method", "target_ratio") if k in compression}
    return {
        "parameters": models.count_params(model),
        "disk_bytes": disk_bytes(spec) if spec else None,
        "model_type": getattr(config, "model_type", None),
        "compression": summary,
    }


def evaluate_model(
    model: str,
    tasks: list[str],
    seq_len: int = 2048,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    adapter: bool = True,
    **options,
) -> dict:
    """Load `model` (anything compressor wrote, a folder, a .gguf, 'demo', a hub id) and run `tasks`;
    adapter=False leaves a compressed folder's PEFT adapter off.

    `options` are `run_tasks`' keyword arguments (batch_size, max_new_tokens, samples_per_task, ...).
    """
    check_tasks(tasks)
    dev = resolve_device(device)
    start = time.time()
    loaded, tokenizer = load_any(model, dtype, str(dev), adapter)
    load_seconds = round(time.time() - start, 3)
    results = evaluate_loaded(loaded, tokenizer, tasks, seq_len, limit, dev, name=str(model), **options)
    adapted = any(isinstance(m, LoraAdapted) for m in loaded.modules())
    results.update(dtype=dtype, adapters_applied=adapted, load_seconds=load_seconds, wall_seconds=round(time.time() - start, 3))
    return results


def evaluate_loaded(model, tokenizer, tasks: list[str], seq_len: int = 2048, limit: int | None = None, device="cpu", *,
                    name: str | None = None, **options) -> dict:
    """`evaluate_model` for a model already in memory; `name` (a spec or folder) sizes it on disk."""
    start = time.time()
    results = run_tasks(model, tokenizer, tasks, seq_len, limit, device, **options)
    settings = {"seq_len": seq_len, "limit": limit, **{k: v for k, v in options.items() if k != "include_path"}}
    return {
        "model": name or getattr(getattr(model, "config", None), "name_or_path", "model"),
        "model_info": model_info(model, name),
        "tasks": results,
        "settings": settings,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "versions": versions(),
        "wall_seconds": round(time.time() - start, 3),
    }

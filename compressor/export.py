"""Writing and reading compressed checkpoints.

A compressed folder is an ordinary Hugging Face checkpoint (config.json, safetensors, tokenizer)
whose config also records what was done (`compression`) and points `auto_map` at a generated
`modeling_compressed.py`. That file is compressor/modules.py verbatim plus two lines naming the
original model class, so plain transformers loads the result with trust_remote_code=True and
`compressor.load` loads it without remote code, both from the same module definitions.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from compressor import modules
from compressor.errors import CompressorError

SHIM_NAME = "modeling_compressed"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; it replaces `out` only if the block finishes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CompressorError(f"output folder {out} already exists; pass --overwrite or choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def shim_source(base_class_name: str) -> str:
    source = Path(modules.__file__).read_text()
    return f"{source}\n\nfrom transformers import {base_class_name}  # noqa: E402\n\nCompressedForCausalLM = compressed_class({base_class_name})\n"


def base_class(config) -> type:
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise CompressorError(f"no causal-LM class for model_type '{config.model_type}' in this transformers version") from None


def save(model, tokenizer, out: str | Path, module_specs: dict, record: dict, report: dict, overwrite: bool = False) -> Path:
    """Write the compressed model to `out` atomically; `record` goes into config.compression."""
    base = base_class(model.config)
    model.config.compression = {"format_version": FORMAT_VERSION, **record, "modules": module_specs}
    model.config.auto_map = {"AutoModelForCausalLM": f"{SHIM_NAME}.CompressedForCausalLM"}
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / f"{SHIM_NAME}.py").write_text(shim_source(base.__name__))
        (tmp / "compression_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return Path(out)


def load(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load any folder this toolkit wrote (or an ordinary checkpoint) without remote code."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CompressorError(f"{path} is not a model folder (no config.json); pass the -o folder of `compressor compress`")
    config = AutoConfig.from_pretrained(path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if getattr(config, "compression", None) is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    cls = modules.compressed_class(base_class(config))
    return cls.from_pretrained(path, config=config, dtype=dtype).to(device).eval()

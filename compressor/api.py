"""The Python API. The CLI is a thin wrapper over these functions."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compressor import distributed, files, limits
from compressor import recipe as recipes
from compressor.calibration.driver import Result
from compressor.errors import CompressorError, check_counts
from compressor.ownership import owns_output
from compressor.pipeline.session import Session, stream_identity
from compressor.pipeline.sinks import FolderSink, ShardSink
from compressor.pipeline.sources import MemorySource, ShardSource


def _context_length(model) -> int | None:
    """The model's context (max_position_embeddings) from a loaded model or a folder's config.json,
    without loading weights; None when unknown (GGUF files, hub ids, built-in names)."""
    config = getattr(model, "config", None)
    if config is not None:
        config = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    elif isinstance(model, (str, Path)) and (Path(model) / "config.json").is_file():
        try:
            config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # loading reports the broken config
    if not isinstance(config, dict):
        return None
    for c in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions"):
            if isinstance(c.get(key), int) and c[key] > 0:
                return c[key]
    return None


def preflight(model, recipe, out=None, *, ratio=None, samples=None, seq_len=None, overwrite=False, eval_limit=None, eval_seq_len=None,
              target_size=None, target_bits=None) -> recipes.Recipe:
    """The checks that need no weights, run before any expensive work (docs/reference/errors.md): counts in
    range (zero is never "the recipe's value"), the recipe, the output folder (not the source, not a
    file, in a writable place; stale temporaries of killed runs removed), and a calibration window
    within the model's context. Returns the recipe, loaded."""
    check_counts(samples=samples, seq_len=seq_len, eval_limit=eval_limit, eval_seq_len=eval_seq_len)
    recipe = recipes.choose(recipe, ratio, target_size, target_bits)
    if out is not None:
        files.check_output_folder(out, overwrite, source=model if isinstance(model, (str, Path)) else None)
        files.remove_stale_temps(out)
    limits.check_run(model, recipe, samples, seq_len)
    if recipe.needs_calibration:
        wanted = recipe.calibration.seq_len if seq_len is None else seq_len
        context = _context_length(model)
        if context is not None and wanted > context:
            where = "--seq-len" if seq_len is not None else f"{recipe.source}: calibration.seq_len"
            raise CompressorError(f"{where} {wanted} is beyond the model's context of {context} tokens (max_position_embeddings); "
                                  f"use a seq_len of at most {context}")
    return recipe


@owns_output  # one run at a time writes an -o (compressor/ownership.py)
def compress(
    model: str | torch.nn.Module,
    recipe: str | recipes.Recipe | None = None,
    out: str | Path | None = None,
    *,
    tokenizer=None,
    ratio: float | None = None,
    calib: str | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    eval_tasks: list[str] | None = None,
    eval_limit: int | None = None,
    eval_seq_len: int = 2048,
    stream: bool = False,
    resume: bool = False,
    after_layer=None,
    target_size: int | str | None = None,
    target_bits: float | None = None,
) -> Result:
    """Compress `model` (a path, hub id, GGUF file, 'demo', or a loaded model) with `recipe`.

    Args:
        recipe: shipped recipe name (see `compressor.recipe.shipped()`) or a YAML path, or a Recipe;
            None with target_size or target_bits: the shipped 'target' recipe.
        out: folder to write; nothing is written when None.
        ratio: overrides every stage's target parameter reduction of the decoder linears.
        calib: calibration data (shipped set name or path), overriding the recipe's.
        device: "auto" (CUDA when present), "cpu" or "cuda[:N]".
        dtype: the output's precision: "auto" keeps the source's (bfloat16 for a GGUF file, which
            has no 16-bit original), or "float32", "bfloat16", "float16". The source is rounded to it
            first, and each compressed layer again before the next layer is calibrated, so "before"
            and "after" describe models stored alike; Grams, decompositions and quantisation always compute
            in float32/float64.
        eval_tasks: perplexity tasks measured before and after (report["eval"]); eval_limit caps
            the windows of each.
        stream: read the model (a local safetensors folder) one decoder layer at a time and write
            each compressed layer as it is done, for models larger than memory; any recipe.
        resume: continue an interrupted streamed run from its last finished layer (implies stream).
        after_layer: called with i after layer i of a streamed run is durably written (tests).
        target_size: the output's weights at most this size: bytes, "700MB", "1.2GB", or a fraction
            of the dense model, "0.75x" / "75%"; the shipped 'target' recipe then chooses how to
            store each decoder linear within it (docs/guides/target-size.md).
        target_bits: instead, bits per decoder-linear weight, scales and adapters included (3.5).
    """
    # distributed (torchrun / --nproc, docs/guides/distributed.md): every rank runs this function; only
    # rank 0 checks and writes the output folder, the others run with none. No-op in one process.
    primary = True
    if distributed.init():
        primary = distributed.is_primary()
    recipe = preflight(model, recipe, out if primary else None, ratio=ratio, samples=samples, seq_len=seq_len, overwrite=overwrite,
                       eval_limit=eval_limit, eval_seq_len=eval_seq_len, target_size=target_size, target_bits=target_bits)
    streamed = stream or resume
    identity = None
    if streamed:
        if not isinstance(model, (str, Path)) or out is None or eval_tasks:
            raise CompressorError("--stream/--resume read a local safetensors folder (or a built-in model) layer by layer and need -o; "
                                  "evaluate the result in a separate step")
        recipe.check_streamable()
        source = ShardSource(model, tokenizer, dtype)
        sink = ShardSink(out, overwrite, resume, after_layer, write=primary)
        identity = stream_identity(source.folder)
    else:
        source = MemorySource(model, tokenizer, dtype)
        sink = FolderSink(out, overwrite) if out is not None and primary else None
    session = Session(recipe, source, sink, calib=calib, samples=samples, seq_len=seq_len, device=device, eval_tasks=eval_tasks,
                      eval_limit=eval_limit, eval_seq_len=eval_seq_len, identity=identity)
    return session.run()

"""The Python API. The CLI is a thin wrapper over these functions."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from compressor import distributed, files, limits, models
from compressor import recipe as recipes
from compressor.calibration import driver
from compressor.calibration.driver import Result
from compressor.calibration.windows import calibration_windows
from compressor.environment import device_name, resolve_device, versions
from compressor.errors import CompressorError, check_counts
from compressor.eval.tasks import run_tasks
from compressor.export import accounting, checkpoint
from compressor.linalg import check_finite
from compressor.loading import DTYPES, load_model, source_dtype, source_size
from compressor.models import guard_token_ids
from compressor.ownership import owns_output
from compressor.streaming import compress_streaming

log = logging.getLogger("compressor")


def _evaluate(model, tokenizer, tasks, seq_len, limit, device) -> dict:
    home = next(model.parameters()).device
    try:
        return run_tasks(model.to(device), tokenizer, tasks, seq_len, limit, device)
    finally:
        model.to(home)


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


def preflight(model, recipe, out=None, *, ratio=None, samples=None, seq_len=None, overwrite=False, eval_limit=None, eval_seq_len=None) -> recipes.Recipe:
    """The checks that need no weights, run before any expensive work (docs/errors.md): counts in
    range (zero is never "the recipe's value"), the recipe, the output folder (not the source, not a
    file, in a writable place; stale temporaries of killed runs removed), and a calibration window
    within the model's context. Returns the recipe, loaded."""
    check_counts(samples=samples, seq_len=seq_len, eval_limit=eval_limit, eval_seq_len=eval_seq_len)
    if isinstance(recipe, (str, Path)):
        recipe = recipes.load(str(recipe), ratio)
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
    recipe: str | recipes.Recipe,
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
) -> Result:
    """Compress `model` (a path, hub id, GGUF file, 'demo', or a loaded model) with `recipe`.

    Args:
        recipe: shipped recipe name (see `compressor.recipe.shipped()`) or a YAML path, or a Recipe.
        out: folder to write; nothing is written when None.
        ratio: overrides every stage's target parameter reduction of the decoder linears.
        calib: calibration data (shipped set name or path), overriding the recipe's.
        device: "auto" (CUDA when present), "cpu" or "cuda[:N]".
        dtype: the output's precision: "auto" keeps the source's (bfloat16 for a GGUF file, which
            has no 16-bit original), or "float32", "bfloat16", "float16". The source is rounded to it
            first, so "before" and "after" describe models stored alike; Grams, decompositions and
            GPTQ always compute in float32/float64.
        eval_tasks: perplexity tasks measured before and after (report["eval"]); eval_limit caps
            the windows of each.
        stream: read the model (a local safetensors folder) one decoder layer at a time and write
            each compressed layer as it is done, for models larger than memory (compressor/streaming.py).
        resume: continue an interrupted streamed run from its last finished layer (implies stream).
    """
    # distributed (torchrun / --nproc, docs/distributed.md): every rank runs this function; only
    # rank 0 checks and writes the output folder, the others run with none. No-op in one process.
    if distributed.init():
        if stream or resume:
            raise CompressorError("--stream/--resume are not distributed yet; run them in one process (leave out torchrun and --nproc)")
        out = out if distributed.is_primary() else None
    recipe = preflight(model, recipe, out, ratio=ratio, samples=samples, seq_len=seq_len, overwrite=overwrite, eval_limit=eval_limit, eval_seq_len=eval_seq_len)
    if stream or resume:
        if not isinstance(model, (str, Path)) or out is None or eval_tasks:
            raise CompressorError("--stream/--resume read a local safetensors folder layer by layer and need -o; evaluate the result in a separate step")
        return compress_streaming(model, recipe, out, tokenizer=tokenizer, ratio=ratio, calib=calib, samples=samples, seq_len=seq_len,
                                  device=device, dtype=dtype, overwrite=overwrite, resume=resume)
    start = time.time()
    if isinstance(recipe, str):
        recipe = recipes.load(recipe, ratio)
    if out is not None and Path(out).exists() and not overwrite:
        raise CompressorError(f"output folder {out} already exists; pass --overwrite or choose another -o")
    dev = resolve_device(device)
    source_bytes = None
    if isinstance(model, (str, Path)):
        out_dtype = source_dtype(model) if dtype == "auto" else dtype
        source_bytes = source_size(model)
        model, tokenizer = load_model(str(model), dtype="float32")
    else:
        out_dtype = str(next(model.parameters()).dtype).removeprefix("torch.") if dtype == "auto" else dtype
        guard_token_ids(model)
    if out_dtype not in DTYPES:
        raise CompressorError(f"unknown dtype '{out_dtype}'; use one of {', '.join(DTYPES)} or auto")
    # Work in float32 on the weights as the output dtype stores them.
    model = model.to(getattr(torch, out_dtype)).float()
    for name, _, module in models.iter_linears(model):
        check_finite(f"weight {name}", models.weight_of(module).detach())
    params_before, linear_before = models.count_params(model), accounting.linear_params(model)
    evaluation = {}
    if eval_tasks:
        evaluation["before"] = _evaluate(model, tokenizer, eval_tasks, eval_seq_len, eval_limit, dev)

    windows = None
    if recipe.needs_calibration:
        if tokenizer is None:
            raise CompressorError("this recipe needs calibration data, so a tokenizer must be passed with an in-memory model")
        windows = calibration_windows(recipe, tokenizer, calib, samples, seq_len)
    cal = recipe.calibration
    gram_dtype = getattr(torch, cal.gram_dtype)

    with distributed.layer_split(windows is None):  # distributed: a data-free recipe's layers are split over the ranks
        run = driver.run(model, recipe.stages, dev, windows, cal.batch_size, gram_dtype, cal.true_sequential)
        distributed.gather_specs(model, run.specs, sync=bool(eval_tasks))
    specs = run.specs

    params_after, linear_after = accounting.model_values(model), accounting.linear_params(model)
    # Rounded as it will be stored, so "after" measures the model written.
    model.to(getattr(torch, out_dtype)).float()
    if eval_tasks:
        evaluation["after"] = _evaluate(model, tokenizer, eval_tasks, eval_seq_len, eval_limit, dev)
    stage_reports, extra = {}, {}
    for stage in recipe.stages:
        stage_reports.update(stage.report(model, specs))
        extra.update(stage.export(model, specs))
    report = {
        "method": "+".join(s.name for s in recipe.stages),
        "recipe": recipe.to_dict(),
        "target_ratio": next((s.config.ratio for s in recipe.stages if hasattr(s.config, "ratio")), None),
        "achieved_linear_ratio": 1.0 - linear_after / linear_before,
        "params_before": params_before,
        "params_after": params_after,
        "linear_params_before": linear_before,
        "linear_params_after": linear_after,
        "per_module": {name: specs[name]["rank"] if "rank" in specs.get(name, {}) else "dense" for name, _, _ in models.iter_linears_any(model)},
        **{k: v for k, v in stage_reports.items() if k == "quantization"},
        "bits_per_dense_weight": accounting.bits_per_dense_weight(model),
        **{k: v for k, v in stage_reports.items() if k != "quantization"},
        "dtype": out_dtype,
        "source_bytes": source_bytes,
        "calibration": None if windows is None else {"dataset": calib or cal.dataset, "samples": windows.shape[0], "seq_len": windows.shape[1]},
        "eval": evaluation or None,
        "device": str(dev),
        "device_name": device_name(dev),
        "versions": versions(),
    }
    report.update(distributed.describe())  # {} in one process
    report["wall_seconds"] = round(time.time() - start, 3)
    model.to(getattr(torch, out_dtype))
    distributed.barrier("the end of compression")  # distributed: rank 0 writes once every rank is done
    if out is not None:
        record = {"method": report["method"], "recipe": report["recipe"], "target_ratio": report["target_ratio"], "dtype": out_dtype}
        checkpoint.save(model, tokenizer, out, specs, record, report, overwrite=overwrite, extra=extra)
        report["output_bytes"] = accounting.weight_bytes(Path(out))
        log.info("wrote %s", out)
    return Result(model, tokenizer, report, Path(out) if out is not None else None)

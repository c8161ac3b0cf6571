"""Evaluation: paper-protocol perplexity, HumanEval pass@k, and lm-eval tasks, on any model.

Perplexity follows GPTQ, SVD-LLM and their peers: the whole test text is tokenised once, cut into
non-overlapping windows of `seq_len` tokens (the tail that does not fill a window is dropped), and
perplexity is exp of the mean next-token loss over all windows. lm-eval's rolling per-document
perplexity is a different number, so it is not used for these tasks.

Task names: `wikitext2_ppl`, `code_ppl`, `humaneval` (ours, offline, executed in
`compressor.sandbox`), and anything else is handed to lm-eval (`compressor.lmeval`), which must be
installed and must find the task's data offline.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from compressor import datasets, distributed, humaneval, lmeval, models, progress
from compressor.environment import resolve_device, versions
from compressor.errors import CompressorError
from compressor.export import checkpoint
from compressor.loading import check_checkpoint, load_model, resolve_model
from compressor.modules import LoraAdapted

PPL_TASKS = {"wikitext2_ppl": "wikitext2", "code_ppl": "code"}
HUMANEVAL_TASKS = ("humaneval",)
BUILTIN_TASKS = (*PPL_TASKS, *HUMANEVAL_TASKS)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _text_for(name: str) -> str:
    text = datasets.eval_text(name)
    if name == "wikitext2":
        # The papers join the dataset's rows (the raw file's lines) with blank lines.
        text = "\n\n".join(line + "\n" for line in text.split("\n"))
    return text


def context_length(model, seq_len: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return min(seq_len, limit) if limit else seq_len


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 2048, limit: int | None = None, device: str | torch.device = "cpu", batch_size: int = 1,
               per_window: bool = False) -> dict:
    """Token perplexity over non-overlapping windows; `limit` caps the number of windows.
    per_window: also return each window's summed token NLL ("window_nll"), so that two models scored on
    the same windows can be compared window by window (benchmarks/gap.py bootstraps over them)."""
    if seq_len < 2 or batch_size < 1 or (limit is not None and limit < 1):
        raise CompressorError(f"--seq-len must be at least 2, --batch-size and --limit at least 1 (got {seq_len}, {batch_size}, {limit})")
    seq_len = context_length(model, seq_len)
    ids = _token_ids(tokenizer, text, None if limit is None else limit * seq_len)
    n_windows = ids.numel() // seq_len
    if limit is not None:
        n_windows = min(n_windows, limit)
    if n_windows == 0:
        raise CompressorError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}; lower --seq-len")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    total, windows_nll = 0.0, []
    lo, hi = distributed.item_span(n_windows, batch_size)  # distributed: this rank's windows, whole batches; (0, n) in one process
    with progress.bar(hi - lo, "perplexity", "windows") as bar:
        for start in range(lo, hi, batch_size):
            batch = windows[start : min(start + batch_size, hi)].to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            token_nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
            # Summed in float64: thousands of windows of float32 sums drift.
            sums = token_nll.view(batch.shape[0], -1).double().sum(1).tolist()
            windows_nll.extend(sums)
            total += sum(sums)
            bar.update(batch.shape[0])
    if distributed.active():
        # every rank's per-window sums in window order, totalled batch by batch as one process does
        windows_nll = distributed.gather_list(windows_nll, "perplexity")
        total = 0.0
        for start in range(0, n_windows, batch_size):
            total += sum(windows_nll[start : start + batch_size])
    count = n_windows * (seq_len - 1)
    found = {"ppl": math.exp(total / count), "windows": n_windows, "seq_len": seq_len, "tokens": count}
    return {**found, "window_nll": windows_nll} if per_window else found


def _token_ids(tokenizer, text: str, needed: int | None) -> torch.Tensor:
    """The text's token ids; with `needed`, only a prefix that surely covers that many tokens.

    Tokenising all of WikiText-2 takes seconds for a few windows' worth of --limit. A prefix cut at
    a line break tokenises like the whole text except within a few tokens of the cut, so the prefix
    is used only when it holds a wide margin of tokens beyond the windows that are scored.
    """
    margin = 256
    if needed is not None:
        chars = (needed + margin) * 8
        while chars < len(text):
            cut = text.find("\n", chars)
            if cut == -1:
                break
            ids = tokenizer(text[:cut], return_tensors="pt", add_special_tokens=False).input_ids[0]
            if ids.numel() >= needed + margin:
                return ids[:needed]
            chars *= 4
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def check_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """Split `tasks` into ours and lm-eval's; fail early (before any model loads) on what cannot run."""
    if not tasks:
        raise CompressorError(f"no tasks given; use some of {', '.join(BUILTIN_TASKS)} or an lm-eval task name")
    dupes = sorted({t for t in tasks if tasks.count(t) > 1})
    if dupes:
        raise CompressorError(f"task {dupes[0]!r} given twice; list each task once")
    ours = [t for t in tasks if t in BUILTIN_TASKS]
    others = [t for t in tasks if t not in BUILTIN_TASKS]
    if others:
        if not lmeval.available():
            import difflib

            close = difflib.get_close_matches(others[0], BUILTIN_TASKS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise CompressorError(
                f"unknown task '{others[0]}': {hint}built-in tasks are {', '.join(BUILTIN_TASKS)}; "
                f"other names go to lm-eval, which is not installed (pip install -e \".[eval]\")"
            )
    return ours, others


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    seq_len: int = 2048,
    limit: int | None = None,
    device="cpu",
    *,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
    samples_per_task: int = 1,
    temperature: float = 0.2,
    top_p: float = 0.95,
    pass_k: list[int] | None = None,
    workers: int = 2,
    timeout: float = 10.0,
    seed: int = 0,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    per_window: bool = False,
) -> dict:
    """Evaluate an in-memory model on `tasks`; returns {task: metrics (each with "seconds")}.

    `limit` caps perplexity windows, HumanEval problems, and lm-eval documents. HumanEval is greedy
    pass@1 unless `samples_per_task` > 1, which samples (`temperature`, `top_p`) and reports pass@k
    for every k in `pass_k` (default: 1, 10, 100 where k <= samples). per_window: perplexity tasks
    also report each window's summed NLL.
    """
    ours, others = check_tasks(tasks)
    results = {}
    for task in ours:
        start = time.time()
        if task in PPL_TASKS:
            res = perplexity(model, tokenizer, _text_for(PPL_TASKS[task]), seq_len, limit, device, batch_size, per_window)
        else:
            res = _humaneval(model, tokenizer, limit, device, batch_size, max_new_tokens, samples_per_task, temperature, top_p, pass_k, workers, timeout, seed)
        res["seconds"] = round(time.time() - start, 3)
        results[task] = res
    if others:
        start = time.time()
        gen_kwargs = {"max_gen_toks": max_new_tokens} if max_new_tokens is not None else None
        found = lmeval.run_lmeval(
            model, tokenizer, others, limit=limit, batch_size=batch_size, include_path=include_path,
            num_fewshot=num_fewshot, gen_kwargs=gen_kwargs, workers=workers, timeout=timeout, seed=seed,
        )
        seconds = round(time.time() - start, 3)
        for task, row in found.items():
            # One harness call runs every lm-eval task; its time is shared, not split.
            results[task] = {**row, "seconds": seconds, "harness": "lm-eval"}
    return results


def default_pass_k(samples: int) -> list[int]:
    return [k for k in (1, 10, 100) if k <= samples]


def _humaneval(model, tokenizer, limit, device, batch_size, max_new_tokens, samples, temperature, top_p, pass_k, workers, timeout, seed) -> dict:
    if samples < 1:
        raise CompressorError(f"--samples-per-task must be at least 1, got {samples}")
    if samples > 1 and temperature <= 0:
        raise CompressorError(f"--samples-per-task {samples} samples, which needs --temperature > 0 (got {temperature})")
    ks = pass_k or default_pass_k(samples)
    return humaneval.evaluate_humaneval(
        model, tokenizer, limit=limit, k=ks, n=samples, max_new_tokens=max_new_tokens or 512,
        batch_size=batch_size, do_sample=samples > 1, temperature=temperature, top_p=top_p, device=device,
        workers=workers, timeout=timeout, seed=seed,
    )


def load_any(model: str, dtype: str = "float32", device: str = "cpu", adapter: bool = True):
    """A folder written by compressor (or any HF folder) via export.checkpoint.load, with its PEFT adapter
    unless adapter=False; else the loader's specs."""
    path = Path(model)
    if (path / "config.json").is_file():
        check_checkpoint(path)  # T5, no weights, truncated or incomplete checkpoints: one clear error
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise CompressorError(f"{path} has no usable tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__}); save one beside the model") from None
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


def evaluate_loaded(model, tokenizer, tasks: list[str], seq_len: int = 2048, limit: int | None = None, device="cpu", *, name: str | None = None, **options) -> dict:
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

"""Evaluation: perplexity in the papers' protocol.

The protocol of GPTQ, SVD-LLM and their peers: the whole test text is tokenised once, cut into
non-overlapping windows of `seq_len` tokens (the tail that does not fill a window is dropped), and
perplexity is exp of the mean next-token loss over all windows. lm-eval's rolling per-document
perplexity is a different number, so it is not used for these tasks.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from compressor.errors import CompressorError

PPL_TASKS = {"wikitext2_ppl": "wikitext2", "code_ppl": "code"}


def _text_for(name: str) -> str:
    from compressor import datasets

    text = datasets.eval_text(name)
    if name == "wikitext2":
        # The papers join the dataset's rows (the raw file's lines) with blank lines.
        text = "\n\n".join(line + "\n" for line in text.split("\n"))
    return text


def context_length(model, seq_len: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return min(seq_len, limit) if limit else seq_len


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 2048, limit: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Token perplexity over non-overlapping windows; `limit` caps the number of windows."""
    seq_len = context_length(model, seq_len)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_windows = ids.numel() // seq_len
    if limit is not None:
        n_windows = min(n_windows, limit)
    if n_windows == 0:
        raise CompressorError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}; lower --seq-len")
    total, count = 0.0, 0
    for w in tqdm(range(n_windows), desc="perplexity", unit="window", disable=None):
        window = ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0).to(device)
        logits = model(input_ids=window, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total += loss.item()
        count += seq_len - 1
    return {"ppl": math.exp(total / count), "windows": n_windows, "seq_len": seq_len, "tokens": count}


def run_tasks(model, tokenizer, tasks: list[str], seq_len: int = 2048, limit: int | None = None, device="cpu") -> dict:
    results = {}
    for task in tasks:
        if task not in PPL_TASKS:
            raise CompressorError(f"unknown task '{task}'; available: {', '.join(sorted(PPL_TASKS))}")
        results[task] = perplexity(model, tokenizer, _text_for(PPL_TASKS[task]), seq_len, limit, device)
    return results


def load_any(model: str, dtype: str = "float32", device: str = "cpu"):
    """A folder written by compressor (or any HF folder) via export.load; else the loader's specs."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from compressor import export
    from compressor.loading import load_model

    path = Path(model)
    if (path / "config.json").is_file():
        return export.load(path, dtype=dtype, device=device), AutoTokenizer.from_pretrained(path)
    loaded, tokenizer = load_model(model, dtype=dtype)
    return loaded.to(device).eval(), tokenizer


def evaluate_model(model: str, tasks: list[str], seq_len: int = 2048, limit: int | None = None, device: str = "auto", dtype: str = "float32") -> dict:
    import time

    from compressor.pipeline import resolve_device

    dev = resolve_device(device)
    start = time.time()
    loaded, tokenizer = load_any(model, dtype, str(dev))
    results = run_tasks(loaded, tokenizer, tasks, seq_len, limit, dev)
    return {"model": model, "tasks": results, "device": str(dev), "dtype": dtype, "wall_seconds": round(time.time() - start, 3)}

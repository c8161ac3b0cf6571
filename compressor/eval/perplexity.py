"""Paper-protocol perplexity (`wikitext2_ppl`, `code_ppl`).

Perplexity follows GPTQ, SVD-LLM and their peers: the whole test text is tokenised once, cut into
non-overlapping windows of `seq_len` tokens (the tail that does not fill a window is dropped), and
perplexity is exp of the mean next-token loss over all windows. lm-eval's rolling per-document
perplexity is a different number, so it is not used for these tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compressor import datasets, distributed, progress
from compressor.errors import CompressorError
from compressor.eval.base import Task, register


@dataclass
class PerplexityOptions:
    """seq_len: tokens per window (capped at the model's context). limit: windows scored (None:
    all). batch_size: windows per forward pass. per_window: also report each window's summed NLL."""

    seq_len: int = 2048
    limit: int | None = None
    batch_size: int = 1
    per_window: bool = False

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise CompressorError(f"--seq-len must be at least 2, --batch-size and --limit at least 1 (got {self.seq_len}, {self.batch_size}, {self.limit})")


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
    PerplexityOptions(seq_len, limit, batch_size, per_window)  # the same checks as the task's options
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


class _Perplexity(Task):
    Options = PerplexityOptions
    text: str

    def run(self, model, tokenizer, device, options: PerplexityOptions) -> dict:
        return perplexity(model, tokenizer, _text_for(self.text), options.seq_len, options.limit, device, options.batch_size, options.per_window)


@register
class WikiText2(_Perplexity):
    name, text = "wikitext2_ppl", "wikitext2"


@register
class Code(_Perplexity):
    name, text = "code_ppl", "code"

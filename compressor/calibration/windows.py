"""Calibration text -> token windows."""

from __future__ import annotations

import logging

import torch

from compressor import datasets, limits
from compressor.errors import CompressorError, check_counts

log = logging.getLogger("compressor.calibration")


def token_windows(tokenizer, texts: list[str], samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens drawn at seeded random offsets from the joined texts.

    Random windows over one long stream (the GPTQ / SVD-LLM convention) mix files and languages
    in every batch instead of letting one long file dominate a contiguous block.
    """
    # Tokenise only as much text as the windows can use (four times their total), not the corpus,
    # and of one huge text only a prefix (limits.text_budget characters in all).
    wanted, pieces, have = 4 * samples * seq_len, [], 0
    chars = limits.text_budget(samples, seq_len)
    for text in texts:
        text = text[:chars]
        chars -= len(text)
        piece = tokenizer(text + "\n\n", return_tensors="pt", add_special_tokens=False).input_ids[0]
        pieces.append(piece)
        have += piece.numel()
        if have >= wanted or chars <= 0:
            break
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    if ids.numel() <= seq_len:
        raise CompressorError(
            f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}; give more text or a smaller seq_len"
        )
    if ids.numel() < samples * seq_len:
        log.warning("calibration text has %d tokens, fewer than the %d that %d windows of %d need; the windows overlap "
                    "(drawn at random offsets), so give more text for distinct windows", ids.numel(), samples * seq_len, samples, seq_len)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_windows(recipe, tokenizer, calib: str | None, samples: int | None = None, seq_len: int | None = None):
    """The recipe's calibration windows, from `calib` (a shipped set name or a path) when given;
    samples / seq_len override the recipe's (None: the recipe's; a zero is refused, never replaced)."""
    check_counts(samples=samples, seq_len=seq_len)
    cfg = recipe.calibration
    samples = cfg.samples if samples is None else samples
    seq_len = cfg.seq_len if seq_len is None else seq_len
    limits.check_calibration(samples, seq_len)
    texts = datasets.load_texts(calib or cfg.dataset, limits.text_budget(samples, seq_len))
    return token_windows(tokenizer, texts, samples, seq_len, cfg.seed)

"""Calibration text -> token windows."""

from __future__ import annotations

import torch

from compressor import datasets
from compressor.errors import CompressorError, check_counts


def token_windows(tokenizer, texts: list[str], samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens drawn at seeded random offsets from the joined texts.

    Random windows over one long stream (the GPTQ / SVD-LLM convention) mix files and languages
    in every batch instead of letting one long file dominate a contiguous block.
    """
    # Tokenise only as much text as the windows can use (four times their total), not the corpus.
    wanted, pieces, have = 4 * samples * seq_len, [], 0
    for text in texts:
        piece = tokenizer(text + "\n\n", return_tensors="pt", add_special_tokens=False).input_ids[0]
        pieces.append(piece)
        have += piece.numel()
        if have >= wanted:
            break
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    if ids.numel() <= seq_len:
        raise CompressorError(
            f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}; give more text or a smaller seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_windows(recipe, tokenizer, calib: str | None, samples: int | None = None, seq_len: int | None = None):
    """The recipe's calibration windows, from `calib` (a shipped set name or a path) when given;
    samples / seq_len override the recipe's (None: the recipe's; a zero is refused, never replaced)."""
    check_counts(samples=samples, seq_len=seq_len)
    cfg = recipe.calibration
    texts = datasets.load_texts(calib or cfg.dataset)
    return token_windows(tokenizer, texts, cfg.samples if samples is None else samples, cfg.seq_len if seq_len is None else seq_len, cfg.seed)

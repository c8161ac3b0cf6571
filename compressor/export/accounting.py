"""What a compressed model stores: bits per decoder linear, values per module, bytes on disk."""

from __future__ import annotations

import math
from pathlib import Path

from compressor import models, modules


def stored_bits(module) -> float:
    """Bits a decoder linear occupies in the checkpoint (quantised codes with their scales, zeros,
    g_idx); float adapters go to the PEFT folder, quantised ones count (modules.py: the
    compressed-linear interface)."""
    return modules.stored_bits(module)


def bits_per_dense_weight(model) -> float:
    """Everything the decoder linears store (biases and low-rank factors included), per weight of
    the dense model: the number that compares rank reduction, quantisation and both."""
    linears = list(models.iter_linears_any(model))
    dense_weights = sum(math.prod(models.linear_shape(m)) for _, _, m in linears)
    return sum(stored_bits(m) for _, _, m in linears) / dense_weights


def values(module) -> int:
    """Values a module stores, a quantised weight counted as its in x out codes; adapters excluded."""
    return modules.stored_values(module)


def linear_params(model) -> int:
    """Values of every decoder linear, compressed or not."""
    return sum(values(m) for _, _, m in models.iter_linears_any(model))


def model_values(model) -> int:
    """count_params, with quantised weights counted by their logical size and adapters left out."""
    linears = [m for _, _, m in models.iter_linears_any(model)]
    return models.count_params(model) - sum(sum(p.numel() for p in m.parameters()) for m in linears) + sum(values(m) for m in linears)


def weight_bytes(folder: Path) -> int:
    """Bytes of a model folder's weights: its safetensors files, adapters included."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))

"""What a compressed model stores: bits per decoder linear, values per module, bytes on disk."""

from __future__ import annotations

import math
from pathlib import Path

from compressor import models, modules


def stored_bits(module) -> float:
    """Bits a decoder linear occupies in the checkpoint (quantised codes with their scales, zeros,
    g_idx); float adapters go to the PEFT folder, quantised ones count."""
    if isinstance(module, modules.LoraAdapted):
        kept = isinstance(module.lora_A, modules.QuantLinear)
        return stored_bits(module.base) + (stored_bits(module.lora_A) + stored_bits(module.lora_B) if kept else 0)
    if isinstance(module, modules.QuantLinear):
        return sum(t.numel() * t.element_size() * 8 for t in module.buffers())
    if isinstance(module, modules.LowRankLinear) or not list(module.children()):
        own = sum(t.numel() * t.element_size() * 8 for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])
        return own + sum(stored_bits(c) for c in module.children())
    return sum(t.numel() * t.element_size() * 8 for t in module.parameters())


def bits_per_dense_weight(model) -> float:
    """Everything the decoder linears store (biases and low-rank factors included), per weight of
    the dense model: the number that compares rank reduction, quantisation and both."""
    linears = list(models.iter_linears_any(model))
    dense_weights = sum(math.prod(models.linear_shape(m)) for _, _, m in linears)
    return sum(stored_bits(m) for _, _, m in linears) / dense_weights


def values(module) -> int:
    """Values a module stores, a quantised weight counted as its in x out codes; adapters excluded."""
    if isinstance(module, modules.LoraAdapted):
        return values(module.base)
    if isinstance(module, modules.QuantLinear):
        return module.in_features * module.out_features + (0 if module.bias is None else module.bias.numel())
    return sum(p.numel() for p in module.parameters(recurse=False)) + sum(values(c) for c in module.children())


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

"""What a compressed model stores: bits per decoder linear, values per module, bytes on disk."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from compressor import models, modules
from compressor.errors import CompressorError

PEFT_PREFIX = "base_model.model."  # PEFT adapter keys: base_model.model.<module>.lora_A.weight


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


def tensor_bytes(path: Path) -> dict[str, int]:
    """Tensor name -> its data bytes in a safetensors file, read from the header alone (the
    header's own bytes are not any tensor's)."""
    with Path(path).open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def linear_bytes(folder: Path, linears: list[str]) -> dict[str, int]:
    """Bytes each decoder linear occupies in an output folder: every safetensors tensor (adapter
    folder included) whose name is `<linear>.<something>`, PEFT's base_model.model. prefix removed.
    A linear with no tensor means the folder names modules differently: refused rather than
    counted as free."""
    found = dict.fromkeys(linears, 0)
    for file in sorted(Path(folder).rglob("*.safetensors")):
        for key, n in tensor_bytes(file).items():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            owner = name.rsplit(".", 1)[0]
            # the owner is the linear itself (qweight, weight, bias) or a child of it (lora_A.weight)
            while owner and owner not in found:
                owner = owner.rsplit(".", 1)[0] if "." in owner else ""
            if owner:
                found[owner] += n
    missing = [m for m, n in found.items() if n == 0]
    if missing:
        raise CompressorError(f"no tensor of {missing[0]} (and {len(missing) - 1} more linears) in {folder}; "
                              "its tensor names are not the model's module names")
    return found


def dense_linear_weights(model) -> dict[str, int]:
    """Decoder linear name -> its weight count (out x in) in the dense model."""
    return {full: math.prod(models.linear_shape(m)) for full, _, m in models.iter_linears(model)}


def folder_linear_bits(folder: Path, linears: dict[str, int]) -> tuple[float, int]:
    """(bits per dense decoder-linear weight as stored in `folder`, those bytes): what a
    --target-bits budget bounds. linears: name -> out x in (dense_linear_weights)."""
    total = sum(linear_bytes(folder, list(linears)).values())
    return total * 8 / sum(linears.values()), total

"""The GPTQ v1 checkpoint format: packing codes and zeros into int32 words, and the
`quantization_config` that GPTQ loaders (transformers + gptqmodel, vLLM) read."""

from __future__ import annotations

import math
import re

import torch

from compressor.errors import CompressorError
from compressor.modules import BITS, dequantize, pack_chunk, unpack_rows

# ----------------------------------------------------------------------------- GPTQ v1 packing
#
# Layout (AutoGPTQ / GPTQModel "gptq" checkpoint format, int32 words, little-endian bit order):
#   qweight [in*bits/32, out]: column o holds the codes q[o, :] of output row o. Consecutive INPUT
#       indices are packed as a bit stream, code i occupying stream bits [bits*i, bits*i + bits),
#       stream bit p living in word p // 32 at bit p % 32 (low bits first). For 2/4/8 bits this is
#       32/bits whole codes per word; for 3 bits 32 codes fill 3 words and codes 10 and 21 straddle
#       a word boundary (code 10: bits 30-31 of word 0 + bit 0 of word 1; code 21: bit 31 of word 1
#       + bits 0-1 of word 2), exactly AutoGPTQ's `pack` for 3 bits.
#   qzeros [n_groups, out*bits/32]: the same stream along consecutive OUTPUT columns, storing
#       zero - 1 (the v1 convention; v2 stores zero itself).
#   scales [n_groups, out] fp16.   g_idx [in] int32: group of each input column.
#   Dequantised weight (transposed layout): W^T[i, o] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]).

# The unpacking half lives in compressor/modules.py, which exported checkpoints carry.
_chunk, _unpack_rows = pack_chunk, unpack_rows


def _pack_rows(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (n, m) codes along dim 0 into (n*bits/32, m) int32 words."""
    per, n_words = _chunk(bits)
    n, m = vals.shape
    v = vals.to(torch.int64).reshape(n // per, per, m)
    words = torch.zeros(n // per, n_words, m, dtype=torch.int64, device=vals.device)
    for k in range(per):
        w, s = divmod(bits * k, 32)
        words[:, w] |= (v[:, k] << s) & 0xFFFFFFFF
        if s + bits > 32:  # spills into the next word
            words[:, w + 1] |= v[:, k] >> (32 - s)
    words = words.reshape(-1, m)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _check_packable(bits: int, in_features: int, out_features: int) -> None:
    if bits not in BITS:
        raise CompressorError(f"GPTQ packing supports {', '.join(map(str, BITS))} bits, got {bits}")
    per, _ = _chunk(bits)
    if in_features % per or out_features % per:
        raise CompressorError(f"{bits}-bit GPTQ packing needs in and out features divisible by {per}, got {in_features} x {out_features}; "
                              "leave this layer unquantised")


def pack_gptq_v1(result, bits: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors a GPTQ v1 checkpoint stores for one linear layer (CPU tensors)."""
    bits = result.bits if bits is None else bits
    out_f, in_f = result.q.shape
    _check_packable(bits, in_f, out_f)
    if int(result.q.max()) > 2**bits - 1 or int(result.q.min()) < 0:
        raise CompressorError(f"quantised codes do not fit in {bits} bits")
    zeros = result.zeros.cpu()
    if int(zeros.min()) < 1 or int(zeros.max()) > 2**bits - 1:
        raise CompressorError("a zero-point outside [1, 2^bits - 1] cannot be stored in the GPTQ v1 format (it stores zero - 1)")
    return {
        "qweight": _pack_rows(result.q.cpu().T, bits),
        "qzeros": _pack_rows((zeros - 1).T, bits).T.contiguous(),
        "scales": result.scales.cpu().to(torch.float16).contiguous(),
        "g_idx": result.g_idx.cpu().to(torch.int32).contiguous(),
    }


def unpack_gptq_v1(tensors: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int):
    """(q (out, in) int32, zeros (n_groups, out) int32, scales (n_groups, out) fp16, g_idx (in,) int32)."""
    _check_packable(bits, in_features, out_features)
    qweight, qzeros = tensors["qweight"], tensors["qzeros"]
    if tuple(qweight.shape) != (in_features * bits // 32, out_features) or qzeros.shape[1] != out_features * bits // 32:
        raise CompressorError(f"GPTQ tensors have shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}; "
                              f"expected {in_features}x{out_features} at {bits} bits")
    q = _unpack_rows(qweight, bits).T.contiguous()
    zeros = _unpack_rows(qzeros.T, bits).T.contiguous() + 1
    return q, zeros, tensors["scales"], tensors["g_idx"].to(torch.int32)


def dequantize_gptq_v1(tensors: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int) -> torch.Tensor:
    return dequantize(*unpack_gptq_v1(tensors, bits, in_features, out_features))


# ----------------------------------------------------------------------------- quantization_config


def gptq_only(spec: dict) -> bool:
    """A quantised dense layer, stored under its own name (no in-checkpoint adapter around it)."""
    return spec.type == "quant" and spec.adapter is None


# vLLM builds one layer from several checkpoint linears (llama-family naming) and matches the
# `dynamic` rules against the fused layer's name only: fused name -> its members.
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def base_bits(bits_by_module: dict[str, int], weights_by_module: dict[str, int] | None = None) -> int:
    """The width declared as the config's `bits`: the one that holds the most weights (each module
    counts 1 where `weights_by_module` lacks it), so the headline width that model cards and
    loaders' logs show describes most of the stored bytes; an exact tie goes to the lower width."""
    held: dict[int, int] = {}
    for name, bits in bits_by_module.items():
        held[bits] = held.get(bits, 0) + (weights_by_module or {}).get(name, 1)
    return max(sorted(held), key=lambda b: held[b])


def _rule(names: list[str]) -> str:
    """A positive rule matching exactly `names` (re.match semantics, as GPTQModel and vLLM use it)."""
    if len(names) == 1:
        return f"+:^{re.escape(names[0])}$"
    parent = names[0].rpartition(".")[0]
    return f"+:^{re.escape(parent)}\\.(?:{'|'.join(n.rpartition('.')[2] for n in names)})$"


def _bit_rules(bits_by_module: dict[str, int], base: int) -> dict:
    """One {"bits"} override per module whose width is not `base`. The members of a vLLM fused
    group that are all quantised at one width share a rule that also matches the fused name, so
    vLLM builds that fused layer at their width."""
    rules, done = {}, set()
    # In name order, not the caller's: a resumed streamed run gathers its specs in another order,
    # and its config must be the same bytes.
    for name in sorted(bits_by_module):
        bits = bits_by_module[name]
        if name in done:
            continue
        parent, _, leaf = name.rpartition(".")
        for fused, members in VLLM_FUSED.items():
            full = [f"{parent}.{m}" for m in members]
            if leaf in members and all(bits_by_module.get(n) == bits for n in full):
                done.update(full)
                if bits != base:
                    rules[_rule([*full, f"{parent}.{fused}"])] = {"bits": bits}
                break
        else:
            done.add(name)
            if bits != base:
                rules[_rule([name])] = {"bits": bits}
    return rules


def quantization_config(grid: dict, damp: float, static_groups: bool, method: str, skipped: list[str], version: str,
                        bits_by_module: dict[str, int] | None = None, weights_by_module: dict[str, int] | None = None) -> dict:
    """The GPTQ v1 quantization_config for a model whose every compressed linear is `gptq_only`.
    grid: bits, group_size, sym, desc_act. Decoder linears left unquantised (`skipped`) are
    excluded with gptqmodel's `dynamic` negative rules.

    bits_by_module: full module name -> bits, for a model quantised at several widths (one group
    size). `bits` is then `base_bits` of it (weights_by_module: full name -> out x in, see
    `mixed_bits`) and every other width is a positive `dynamic` rule (docs/guides/mixed-bits.md
    says which loaders read them). One width everywhere gives exactly the uniform config."""
    grid = dict(grid)
    rules = {}
    if bits_by_module:
        wrong = sorted({b for b in bits_by_module.values() if b not in BITS})
        if wrong:
            raise CompressorError(f"bits_by_module holds {wrong}; GPTQ packing supports {', '.join(map(str, BITS))} bits")
        both = sorted(set(bits_by_module) & set(skipped))
        if both:
            raise CompressorError(f"{both[0]} is both quantised (bits_by_module) and skipped; list it in one of them")
        grid["bits"] = base_bits(bits_by_module, weights_by_module)
        rules = _bit_rules(bits_by_module, grid["bits"])
    return {
        **grid,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "format": "gptq",
        "pack_dtype": "int32",
        "damp_percent": damp,
        "static_groups": static_groups,
        "true_sequential": False,
        "dynamic": {**{f"-:^{re.escape(name)}$": {} for name in skipped}, **rules},
        "meta": {"quantizer": [f"compressor:{version}"], "method": method},
    }


def mixed_bits(specs: dict) -> dict:
    """quantization_config's bits_by_module and weights_by_module from the module specs of a
    model whose every compressed linear is `gptq_only`; one group size is required, since the
    rules carry bits only."""
    other = sorted(n for n, spec in specs.items() if not gptq_only(spec))
    if other:
        raise CompressorError(f"{other[0]} is not a plain quantised linear; only a model whose every compressed linear is GPTQ-only has a GPTQ config")
    groups = {spec.group_size for spec in specs.values()}
    if len(groups) > 1:
        raise CompressorError(f"the quantised linears use group sizes {sorted(groups)}; a mixed-bit GPTQ export declares one group size for all")
    return {"bits_by_module": {n: s.bits for n, s in specs.items()}, "weights_by_module": {n: s.out * s.inp for n, s in specs.items()}}


def declared_bits(config: dict, name: str) -> int | None:
    """The bits a GPTQ loader that reads `dynamic` gives the module `name` (None: left
    unquantised): the first rule whose regex re.match-es the name decides, as GPTQModel and vLLM
    resolve it; no rule matching means the base `bits`."""
    for key, overrides in (config.get("dynamic") or {}).items():
        negative = key.startswith("-:")
        if re.match(key[2:] if key.startswith(("-:", "+:")) else key, name):
            return None if negative else overrides.get("bits", config["bits"])
    return config["bits"]


def effective_bits(bits: int, group_size: int, in_features: int, out_features: int, scale_bits: int = 16) -> float:
    """Stored bits per weight: codes, plus per group an fp16 scale and a `bits`-wide zero, plus g_idx."""
    n_groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    total = in_features * out_features * bits + n_groups * out_features * (scale_bits + bits) + in_features * 32
    return total / (in_features * out_features)

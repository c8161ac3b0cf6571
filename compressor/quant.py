"""Weight-only integer quantisation: round-to-nearest, GPTQ, and the GPTQ v1 checkpoint format.

Grid. Each group of `group_size` consecutive input columns of W (out x in) has, per output row, a
scale s and an integer zero z; a weight is stored as a code q in [0, 2^bits - 1] and read back as
s * (q - z). Scales are rounded to fp16 *before* quantising, so the dequantised weight we return is
bit-for-bit what a GPTQ kernel reconstructs from the packed checkpoint.

GPTQ (Frantar et al., arXiv 2210.17323) quantises columns one at a time and spreads each column's
rounding error over the not-yet-quantised columns so as to minimise ||(W - W_hat) X||_F, using only
H = X^T X / N and the upper Cholesky factor U of H^-1 (H^-1 = U^T U):
    err = (w_j - q_j) / U_jj,    W[:, k] -= err * U_jk  for k > j.
Updates inside a block of 128 columns are applied eagerly, those to later columns in one matmul
per block ("lazy batch"); the result is identical to the column-by-column algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compressor import modules
from compressor.errors import CompressorError
from compressor.modules import dequantize, pack_chunk, unpack_rows

BLOCK = 128
FP16 = torch.finfo(torch.float16)


@dataclass
class QuantConfig:
    """bits: 2, 3, 4 or 8. group_size: input columns sharing a scale (-1: one per output row).
    sym: symmetric grid, zero fixed at 2^(bits-1). act_order: quantise columns by decreasing
    H_ii (GPTQ's desc_act). damp: added to H as damp * mean(diag H) * I. static_groups: with
    act_order, fix every group's scale/zero from the unquantised W before the sweep, so groups
    stay contiguous in the original order (g_idx = i // group_size)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    damp: float = 0.01
    static_groups: bool = False

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise CompressorError(f"quantisation bits must be 2, 3, 4 or 8, got {self.bits}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or not (self.group_size == -1 or self.group_size > 0):
            raise CompressorError(f"group_size must be -1 (per output channel) or a positive integer such as 128, got {self.group_size!r}")
        if not 0 <= self.damp < 1:
            raise CompressorError(f"damp must be in [0, 1) (a fraction of mean(diag H); 0.01 is usual), got {self.damp}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)


@dataclass
class QuantResult:
    """w_hat: dequantised weight (out, in) float32, equal to scales[g] * (q - zeros[g]) per column.
    q: codes (out, in) int32. scales: (n_groups, out) float16. zeros: (n_groups, out) int32.
    g_idx: (in,) int32, the group of each input column (not monotone under act_order)."""

    w_hat: torch.Tensor
    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int


# ----------------------------------------------------------------------------- the grid

def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale float32 holding an fp16 value, zero int32) covering the rows of w (out, k)."""
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.amin(dim=1).clamp_max(0)
    xmax = w.amax(dim=1).clamp_min(0)
    if sym:
        amax = torch.maximum(-xmin, xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        # The v1 format stores zero - 1, so a zero of 0 cannot be written (GPTQModel notes ~13%
        # of asym v1 checkpoints overflow). Where the range would give zero 0 (xmin > -scale/2),
        # widen it downwards just enough that the zero lands on 1.
        small = -xmin < (xmax - xmin) / maxq / 2
        xmin = torch.where(small, -xmax / (maxq - 1), xmin)
        scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2 / maxq))  # all-zero rows
    scale = scale.clamp(FP16.tiny, FP16.max).half().float()
    if not sym:
        zero = torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero.int()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantised values of w (out, k) for per-row scale/zero (out,)."""
    scale, zero = scale[:, None], zero[:, None].float()
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q.int(), scale * (q - zero)


def _group_index(cfg: QuantConfig, in_features: int) -> torch.Tensor:
    if cfg.group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // cfg.group_size).int()


def rtn_quantize(W: torch.Tensor, cfg: QuantConfig) -> QuantResult:
    """Round-to-nearest on the same grid: the baseline GPTQ must beat."""
    W = W.detach().float()
    out_f, in_f = W.shape
    g_idx = _group_index(cfg, in_f)
    n_groups = cfg.n_groups(in_f)
    scales = torch.empty(n_groups, out_f, dtype=torch.float16, device=W.device)
    zeros = torch.empty(n_groups, out_f, dtype=torch.int32, device=W.device)
    q = torch.empty(out_f, in_f, dtype=torch.int32, device=W.device)
    w_hat = torch.empty_like(W)
    g = in_f if cfg.group_size == -1 else cfg.group_size
    for k in range(n_groups):
        cols = slice(k * g, (k + 1) * g)
        s, z = grid_params(W[:, cols], cfg.bits, cfg.sym)
        q[:, cols], w_hat[:, cols] = quantize_codes(W[:, cols], s, z, cfg.maxq)
        scales[k], zeros[k] = s.half(), z
    return QuantResult(w_hat, q, scales, zeros, g_idx.to(W.device), cfg.bits)


# ----------------------------------------------------------------------------- GPTQ

def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper U with U^T U = (H + delta I)^-1, delta = damp * mean(diag H); more damping on failure."""
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    mean_diag = H.diagonal().mean().item()
    for attempt in range(8):
        delta = (damp if attempt == 0 else max(damp, 1e-3) * 10**attempt) * mean_diag
        L, info = torch.linalg.cholesky_ex(H + delta * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U
    raise CompressorError("GPTQ could not factor the input Gram even with heavy damping; the calibration activations are degenerate (collect more samples)")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> QuantResult:
    """GPTQ of W (out, in) against the input Gram H (in, in). Returns codes in the original column order."""
    device = W.device
    W = W.detach().float().clone()
    H = H.detach().to(device=device, dtype=torch.float64).clone()
    H = (H + H.T) / 2
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise CompressorError(f"input Gram has shape {tuple(H.shape)} but the weight has {in_f} input features")
    if not torch.isfinite(H).all():
        raise CompressorError("input Gram contains NaN or Inf; calibration activations overflowed (run calibration in float32)")

    # Inputs that are always zero: their weights cannot affect the output, so they are set to 0
    # (exactly representable) and given the live channels' mean diagonal to keep H invertible
    # without skewing the damping.
    dead = H.diagonal() <= 0
    live_mean = H.diagonal()[~dead].mean() if (~dead).any() else H.new_tensor(1.0)
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = live_mean
    W[:, dead] = 0

    g = in_f if cfg.group_size == -1 else cfg.group_size
    n_groups = cfg.n_groups(in_f)
    perm = torch.argsort(H.diagonal(), descending=True) if cfg.act_order else torch.arange(in_f, device=device)
    static = cfg.static_groups or cfg.group_size == -1
    if static:
        # Groups fixed up front in the original column order (per-channel is one such group).
        stat = [grid_params(W[:, i:i + g], cfg.bits, cfg.sym) for i in range(0, in_f, g)]
        group_of = (perm // g).tolist()  # group of the j-th processed column
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, cfg.damp).float()
    del H

    # Blocks must not cut a group that starts mid-block, so that each group's scale is computed
    # from fully updated columns: use blocks of 128 when group_size divides 128 or vice versa.
    block = BLOCK if static or BLOCK % g == 0 or g % BLOCK == 0 else g

    Q = torch.empty_like(W)
    codes = torch.empty(out_f, in_f, dtype=torch.int32, device=device)
    scales = torch.empty(n_groups, out_f, dtype=torch.float16, device=device)
    zeros = torch.empty(n_groups, out_f, dtype=torch.int32, device=device)
    if static:
        for k, (s, z) in enumerate(stat):
            scales[k], zeros[k] = s.half(), z
    scale = zero = None
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()
        Err = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static:
                scale, zero = stat[group_of[j]]
            elif j % g == 0:
                # Scale/zero of a new group, from its columns as updated so far: a group starts
                # a block (W is current there) or lies inside one (W1 is).
                cols = W[:, j:j + g] if i == 0 else W1[:, i:i + g]
                scale, zero = grid_params(cols, cfg.bits, cfg.sym)
                scales[j // g], zeros[j // g] = scale.half(), zero
            w = W1[:, i]
            code, q = quantize_codes(w[:, None], scale, zero, cfg.maxq)
            codes[:, j], Q[:, j] = code[:, 0], q[:, 0]
            err = (w - q[:, 0]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    g_idx = (torch.arange(in_f, device=device) // g).int()
    if not static:
        g_idx = g_idx[inv]  # column perm[j] was the j-th quantised, so it sits in group j // g
    return QuantResult(Q[:, inv].contiguous(), codes[:, inv].contiguous(), scales, zeros, g_idx, cfg.bits)


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
    if bits not in (2, 3, 4, 8):
        raise CompressorError(f"GPTQ packing supports 2, 3, 4 or 8 bits, got {bits}")
    per, _ = _chunk(bits)
    if in_features % per or out_features % per:
        raise CompressorError(f"{bits}-bit GPTQ packing needs in and out features divisible by {per}, got {in_features} x {out_features}; leave this layer unquantised")


def pack_gptq_v1(result: QuantResult, bits: int | None = None) -> dict[str, torch.Tensor]:
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
        raise CompressorError(f"GPTQ tensors have shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}; expected {in_features}x{out_features} at {bits} bits")
    q = _unpack_rows(qweight, bits).T.contiguous()
    zeros = _unpack_rows(qzeros.T, bits).T.contiguous() + 1
    return q, zeros, tensors["scales"], tensors["g_idx"].to(torch.int32)


def dequantize_gptq_v1(tensors: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int) -> torch.Tensor:
    return dequantize(*unpack_gptq_v1(tensors, bits, in_features, out_features))


def effective_bits(bits: int, group_size: int, in_features: int, out_features: int, scale_bits: int = 16) -> float:
    """Stored bits per weight: codes, plus per group an fp16 scale and a `bits`-wide zero, plus g_idx."""
    n_groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    total = in_features * out_features * bits + n_groups * out_features * (scale_bits + bits) + in_features * 32
    return total / (in_features * out_features)


# ----------------------------------------------------------------------------- module

class QuantLinear(modules.QuantLinear):
    """The runtime GPTQ layer (compressor/modules.py), plus its construction from a QuantResult."""

    @classmethod
    def from_result(cls, result: QuantResult, group_size: int, bias: torch.Tensor | None = None) -> QuantLinear:
        out_f, in_f = result.q.shape
        mod = cls(in_f, out_f, result.bits, group_size, bias=bias is not None, dtype=bias.dtype if bias is not None else torch.float16)
        for name, t in pack_gptq_v1(result).items():
            getattr(mod, name).copy_(t)
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod.to(result.w_hat.device)

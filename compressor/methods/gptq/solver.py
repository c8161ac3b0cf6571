"""Weight-only integer quantisation: round-to-nearest and GPTQ (the checkpoint format: compressor/methods/gptq/format.py).

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
from compressor.errors import MAX_COUNT, CompressorError, check_choice, check_float, shown
from compressor.methods.gptq.format import pack_gptq_v1

BLOCK = 128
BITS = modules.BITS
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
        check_choice("bits", self.bits, BITS)
        check_group_size(self.group_size)
        check_float("damp", self.damp, 0, 1, high_open=True)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)


def check_group_size(group_size) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or 1 <= group_size <= MAX_COUNT):
        raise CompressorError(f"key 'group_size' must be -1 (one scale per output row) or an integer >= 1 such as 128, got {shown(group_size)}")


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

def grid_params(w: torch.Tensor, bits, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale float32 holding an fp16 value, zero int32) covering the rows of w (out, k).
    bits: an int, or a per-row int tensor (out,) when one sweep quantises several widths at once."""
    maxq = 2**bits - 1
    several = not isinstance(maxq, int)
    w = w.float()
    xmin = w.amin(dim=1).clamp_max(0)
    xmax = w.amax(dim=1).clamp_min(0)
    if sym:
        amax = torch.maximum(-xmin, xmax)
        scale = 2 * amax / maxq
        zero = ((maxq + 1) // 2).to(scale.dtype) if several else torch.full_like(scale, (maxq + 1) // 2)
    else:
        # The v1 format stores zero - 1, so a zero of 0 cannot be written (GPTQModel notes ~13%
        # of asym v1 checkpoints overflow). Where the range would give zero 0 (xmin > -scale/2),
        # widen it downwards just enough that the zero lands on 1.
        small = -xmin < (xmax - xmin) / maxq / 2
        xmin = torch.where(small, -xmax / (maxq - 1), xmin)
        scale = (xmax - xmin) / maxq
    empty = (2 / maxq).to(scale.dtype) if several else torch.full_like(scale, 2 / maxq)
    scale = torch.where(scale > 0, scale, empty)  # all-zero rows
    scale = scale.clamp(FP16.tiny, FP16.max).half().float()
    if not sym:
        zero = torch.round(-xmin / scale).clamp_min(1).minimum(maxq.to(scale.dtype)) if several else torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero.int()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantised values of w (out, k) for per-row scale/zero (out,); maxq an int or per row (out,)."""
    scale, zero = scale[:, None], zero[:, None].float()
    if isinstance(maxq, int):
        q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    else:
        q = (torch.round(w / scale) + zero).clamp_min(0).minimum(maxq[:, None].to(w.dtype))
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


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, row_bits: torch.Tensor | None = None) -> QuantResult:
    """GPTQ of W (out, in) against the input Gram H (in, in). Returns codes in the original column order.
    row_bits: a width per output row instead of cfg.bits (gptq_widths; the result's `bits` is then
    meaningless and only w_hat is used)."""
    device = W.device
    bits = cfg.bits if row_bits is None else row_bits.to(device)
    maxq = 2**bits - 1
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
        stat = [grid_params(W[:, i:i + g], bits, cfg.sym) for i in range(0, in_f, g)]
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
                scale, zero = grid_params(cols, bits, cfg.sym)
                scales[j // g], zeros[j // g] = scale.half(), zero
            w = W1[:, i]
            code, q = quantize_codes(w[:, None], scale, zero, maxq)
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


def gptq_widths(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, widths: list[int]) -> dict[int, torch.Tensor]:
    """{bits: dequantised GPTQ result} of W at each width, in one sweep. Given H, GPTQ treats the
    rows of W independently (the same column order, Cholesky factor and error feedback per row), so
    copies of W stacked along the rows, each with its own grid, give every width's result for one
    pass of the column loop, which is what costs on a CPU."""
    out_f = W.shape[0]
    stacked = W.detach().float().repeat(len(widths), 1)
    row_bits = torch.tensor(list(widths), device=W.device).repeat_interleave(out_f)
    w_hat = gptq_quantize(stacked, H, cfg, row_bits=row_bits).w_hat
    return {b: w_hat[k * out_f:(k + 1) * out_f] for k, b in enumerate(widths)}


# ----------------------------------------------------------------------------- module


def to_module(result: QuantResult, group_size: int, bias: torch.Tensor | None = None) -> modules.QuantLinear:
    """The runtime GPTQ layer (compressor/modules.py) holding `result`, packed as GPTQ v1."""
    out_f, in_f = result.q.shape
    mod = modules.QuantLinear(in_f, out_f, result.bits, group_size, bias=bias is not None, dtype=bias.dtype if bias is not None else torch.float16)
    for name, t in pack_gptq_v1(result).items():
        getattr(mod, name).copy_(t)
    if bias is not None:
        mod.bias.copy_(bias.detach())
    return mod.to(result.w_hat.device)

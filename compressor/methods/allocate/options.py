"""What each way of storing one decoder linear costs, in bytes on disk, and what it loses.

An option is (bits, rank): GPTQ codes of `bits` bits on the recipe's grid, plus (rank > 0) a float
EoRA adapter B (out x rank) A (rank x in) in the output dtype, written to the PEFT folder.

Cost: exactly what the GPTQ v1 export and the adapter file store for it, byte for byte (the
tests compare it with the tensors written):
    qweight  in * bits / 32 int32 words per output column      in * out * bits / 8 bytes
    qzeros   per group, out * bits / 32 int32 words            groups * out * bits / 8
    scales   per group and output, float16                     groups * out * 2
    g_idx    one int32 per input                               in * 4
    bias     out values of the output dtype (when the layer has one)
    adapter  rank * (in + out) values of the output dtype

Loss: the output error of the option on the calibration inputs, ||W_d (W - Q_b - B_r A_r) X||^2 / N
with W_d = diag(sqrt(D)) the loss-sensitivity weights of the output channels (D = 1 with
`weighting: output`). Q_b is the linear's actual GPTQ result at b bits, not a model of it. The
best rank-r adapter for that error is the truncated SVD in the Gram's eigenspace (eora/fit.py), so
one spectrum per (linear, bits) prices every rank: error(b, r) = sum_{i >= r} S_i^2 of
W_d (W - Q_b) Q L^1/2. With loss weights, half this error is the second-order estimate of the rise
in the mean next-token loss (eora/sensitivity.py), so errors of different linears add up to
one estimate for the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compressor import linalg
from compressor.modules import pack_chunk


@dataclass(frozen=True)
class Option:
    bits: int
    rank: int

    @property
    def label(self) -> str:
        return f"{self.bits}-bit" + (f" + rank {self.rank}" if self.rank else "")


def packable(bits: int, out_f: int, in_f: int) -> bool:
    """Whether GPTQ v1 packing holds a dense out x in weight at `bits` (3 bits needs multiples of 32)."""
    per = pack_chunk(bits)[0]
    return in_f % per == 0 and out_f % per == 0


def quant_bytes(out_f: int, in_f: int, bits: int, group_size: int) -> int:
    """Bytes of one GPTQ v1 layer's qweight, qzeros, scales and g_idx."""
    groups = 1 if group_size == -1 else math.ceil(in_f / group_size)
    return in_f * out_f * bits // 8 + groups * out_f * bits // 8 + groups * out_f * 2 + in_f * 4


def option_bytes(out_f: int, in_f: int, option: Option, group_size: int, value_bytes: int, bias: bool) -> int:
    """Bytes on disk of one linear stored as `option` (value_bytes: the output dtype's size)."""
    return quant_bytes(out_f, in_f, option.bits, group_size) + (out_f * value_bytes if bias else 0) + option.rank * (in_f + out_f) * value_bytes


def spectrum_energies(dW: torch.Tensor, H: torch.Tensor, root: torch.Tensor, row_weight: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """(S_i^2 of W_d dW R, float64 on CPU, descending; the whole error tr(W_d dW H dW^T W_d)).
    Component i of the best adapter removes S_i^2 of the weighted output error. R = gram_root(H)
    leaves out the Gram directions that the adapter fit leaves out (eora/fit.py), so the energies
    are exactly what eora_fit's adapter removes. The whole error still counts every direction."""
    M = dW.to(torch.float64)
    if row_weight is not None:
        M = row_weight.to(M.device, torch.float64)[:, None] * M
    (values,) = linalg.svdvals([M @ root.to(M.device, torch.float64)], dtype=torch.float64)
    return values.square().cpu(), output_error(M, H)


def output_error(M: torch.Tensor, H: torch.Tensor) -> float:
    """||M X||^2 / N = tr(M H M^T), in float64 (rounding below zero clipped)."""
    M = M.to(torch.float64)
    return max(float(((M @ H.to(M.device, torch.float64)) * M).sum()), 0.0)


def gram_root(H: torch.Tensor) -> torch.Tensor:
    """R = Q L^1/2 with H = Q L Q^T, so that ||M X||^2 / N = ||M R||_F^2, without the eigenvalues
    eora_fit treats as zero (at most float32 rounding of the largest: directions the data never
    visits, where no adapter is fitted)."""
    (lam, Q), = linalg.eigh([H.to(torch.float64)], dtype=torch.float64)
    eps = lam.max().clamp_min(0).item() * H.shape[0] * torch.finfo(torch.float32).eps
    return Q * torch.where(lam > eps, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))


def errors_by_rank(energies: torch.Tensor, ranks: list[int], total: float | None = None) -> list[float]:
    """The error left by the best adapter of each rank: the whole error (default: the energies'
    sum) less what its top components remove."""
    total = float(energies.sum()) if total is None else total
    cumulative = torch.cumsum(energies, 0)
    found = []
    for r in ranks:
        removed = 0.0 if r == 0 or energies.numel() == 0 else float(cumulative[min(r, energies.numel()) - 1])
        found.append(max(total - removed, 0.0))
    return found

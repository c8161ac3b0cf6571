"""LOST-style post-training decomposition: low-rank part plus a channel-sparse residual.

After LOST (Li et al., arXiv 2508.02668), which splits W into dominant singular components and a
residual kept on whole input channels. Here, for a pretrained W:
  L = truncated SVD of W (rank r), R = W - L;
  columns J = the top `sparse_fraction` of input channels by ||R[:, j]||, or, with
  `activation_weighted`, by ||R[:, j]|| * ||X_j|| (the channel's RMS activation, sqrt(H_jj));
  values S on J: R[:, J] (the Frobenius-optimal fit on that support), or with activation weighting
  the output-optimal fit argmin ||(R - S E_J^T) X|| = R H[:, J] H[J, J]^-1.
Stored as values (out x |J|) plus sorted column indices; both count towards the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor import linalg
from compressor.errors import MAX_DAMP, check_float
from compressor.methods import register
from compressor.methods.base import RankConfig, RankMethod


@dataclass
class LostConfig(RankConfig):
    """sparse_fraction: share of input columns kept in the residual; activation_weighted: score and
    fit the residual by calibration activations (needs calibration data)."""

    sparse_fraction: float = 0.05
    activation_weighted: bool = True
    damp: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        check_float("sparse_fraction", self.sparse_fraction, 0, 1, low_open=True, high_open=True)
        check_float("damp", self.damp, 0, most=MAX_DAMP)


def sparse_columns(in_features: int, fraction: float) -> int:
    return max(1, int(round(fraction * in_features)))


@register
class Lost(RankMethod):
    name = "lost"
    Config = LostConfig

    @property
    def needs_gram(self) -> bool:
        return self.config.activation_weighted

    def extra_params(self, shape):
        out_f, in_f = shape
        return sparse_columns(in_f, self.config.sparse_fraction) * (out_f + 1)  # values + an index each

    def module_spec(self, shape, rank, bias):
        return super().module_spec(shape, rank, bias).replace(type="lowrank_sparse", cols=sparse_columns(shape[1], self.config.sparse_fraction))

    def energies(self, weights, grams):
        return [s.square() for s in linalg.svdvals(weights, dtype=torch.float64)]

    def decompose(self, weights, grams, ranks):
        factors = []
        for w, h, (u, s, vh), k in zip(weights, grams, linalg.svd(weights, dtype=torch.float64, ranks=ranks), ranks):
            up, down = linalg.split_factors(u, s, vh, k)
            residual = w.double() - up @ down
            factors.append({"up.weight": up, "down.weight": down, **self.residual_columns(residual, h)})
        return factors

    def residual_columns(self, residual: torch.Tensor, gram: torch.Tensor | None) -> dict:
        count = sparse_columns(residual.shape[1], self.config.sparse_fraction)
        score = residual.norm(dim=0)
        if gram is not None:
            score = score * gram.diagonal().double().clamp_min(0).sqrt()
        cols = score.topk(count).indices.sort().values
        if gram is None:
            values = residual[:, cols]
        else:
            h = gram.double()
            block = h[cols][:, cols]
            block = block + self.config.damp * block.diagonal().mean().clamp_min(1e-30) * torch.eye(count, dtype=h.dtype, device=h.device)
            values = torch.linalg.solve(block, (residual @ h[:, cols]).T).T
        return {"sparse_values": values, "sparse_cols": cols}

"""LoRD (Kaushal, Vaidhya, Rish; arXiv 2309.14021): one-shot low-rank decomposition for code LLMs.

The paper's text supports two readings, so both are offered:
- variant "weight": truncated SVD of W (identical to the `svd` method's factors);
- variant "data": keep the principal directions of the layer's outputs on calibration data.
  With Y = W X, the top-k eigenvectors U_k of Y Y^T / N = W H W^T give W_k = U_k U_k^T W, stored
  as up = U_k (out x k) and down = U_k^T W (k x in). The dropped eigenvalues are exactly the
  output energy lost, the same optimum as whitened truncation when H is full rank, but the
  factors never invert H, so unused input directions keep W's own weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor import linalg
from compressor.errors import check_choice
from compressor.methods import register
from compressor.methods.base import RankConfig, RankMethod


@dataclass
class LordConfig(RankConfig):
    """variant: "data" (output PCA on calibration data) or "weight" (weight SVD)."""

    variant: str = "data"

    def __post_init__(self):
        super().__post_init__()
        check_choice("variant", self.variant, ("data", "weight"))


@register
class Lord(RankMethod):
    name = "lord"
    Config = LordConfig

    @property
    def needs_gram(self) -> bool:
        return self.config.variant == "data"

    def _output_eigs(self, weights, grams):
        covs = [w.double() @ h.double() @ w.double().T for w, h in zip(weights, grams)]
        return [(lam.flip(0).clamp_min(0), q.flip(1)) for lam, q in linalg.eigh(covs)]

    def energies(self, weights, grams):
        if not self.needs_gram:
            return [s.square() for s in linalg.svdvals(weights, dtype=torch.float64)]
        return [lam for lam, _ in self._output_eigs(weights, grams)]

    def decompose(self, weights, grams, ranks):
        if not self.needs_gram:
            return [dict(zip(("up.weight", "down.weight"), linalg.split_factors(u, s, vh, k)))
                    for (u, s, vh), k in zip(linalg.svd(weights, ranks=ranks), ranks)]
        factors = []
        for w, (_, q), k in zip(weights, self._output_eigs(weights, grams), ranks):
            basis = q[:, :k]
            factors.append({"up.weight": basis, "down.weight": basis.T @ w.to(torch.float64)})
        return factors

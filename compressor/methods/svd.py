"""Plain truncated SVD of the weight: the best rank-k approximation of W in Frobenius norm
(Eckart-Young). Data-free; the baseline every data-aware method must beat."""

from __future__ import annotations

import torch

from compressor import linalg
from compressor.methods import register
from compressor.methods.base import RankMethod


@register
class SVD(RankMethod):
    name = "svd"

    def energies(self, weights, grams):
        return [s.square() for s in linalg.svdvals(weights, dtype=torch.float64)]

    def decompose(self, weights, grams, ranks):
        return [
            dict(zip(("up.weight", "down.weight"), linalg.split_factors(u, s, vh, k)))
            for (u, s, vh), k in zip(linalg.svd(weights, ranks=ranks), ranks)
        ]

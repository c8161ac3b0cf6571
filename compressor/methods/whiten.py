"""Activation-aware truncation (the SVD-LLM / ASVD family).

Minimises the error of the layer's output on calibration data, ||(W - W_k) X||_F, not the weight
error. With H = X^T X / N = S S^T this equals ||(W - W_k) S||_F, so the best rank-k W_k is the
truncated SVD of W S mapped back by S^-1: W_k = U_k Sigma_k V_k^T S^-1, and each dropped singular
value of W S is exactly the output error it costs (Wang et al., SVD-LLM, arXiv 2403.07378).
S comes from a damped eigen-decomposition rather than SVD-LLM's Cholesky, so a singular H (unused
channels, little data) degrades gracefully instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass

from compressor import linalg
from compressor.errors import MAX_DAMP, check_float
from compressor.methods import register
from compressor.methods.base import RankConfig, RankMethod


@dataclass
class WhitenConfig(RankConfig):
    """damp: added to H as damp * mean(diag H) * I before whitening."""

    damp: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        check_float("damp", self.damp, 0, most=MAX_DAMP)


@register
class Whiten(RankMethod):
    name = "whiten"
    Config = WhitenConfig
    needs_gram = True

    def _whitened(self, weights, grams):
        roots = linalg.whitening(grams, self.config.damp)
        return [w.to(s.dtype) @ s for w, (s, _) in zip(weights, roots)], roots

    def energies(self, weights, grams):
        scaled, _ = self._whitened(weights, grams)
        return [s.square() for s in linalg.svdvals(scaled, dtype=scaled[0].dtype)]

    def decompose(self, weights, grams, ranks):
        scaled, roots = self._whitened(weights, grams)
        factors = []
        for (u, s, vh), (_, s_inv), k in zip(linalg.svd(scaled, dtype=scaled[0].dtype, ranks=ranks), roots, ranks):
            up, down = linalg.split_factors(u, s, vh, k)
            factors.append({"up.weight": up, "down.weight": down @ s_inv})
        return factors

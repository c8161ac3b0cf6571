"""WeLore (Jaiswal et al., arXiv 2407.11239): data-free, per-matrix ranks from the min-max
normalised singular spectrum under one global threshold (compressor/ranks.py:welore), plain SVD
factors. Matrices whose rank would not save parameters stay dense (the paper's N-LRC)."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.methods import register
from compressor.methods.base import RankConfig
from compressor.methods.svd import SVD


@dataclass
class WeLoreConfig(RankConfig):
    allocation: str = "welore"


@register
class WeLore(SVD):
    name = "welore"
    Config = WeLoreConfig

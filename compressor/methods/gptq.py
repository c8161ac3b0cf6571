"""GPTQ (and its round-to-nearest baseline) as a recipe stage, on dense and low-rank layers.

The maths (the column sweep with the inverse-Hessian Cholesky factor, the grid, the v1 packing)
is in compressor/quant.py; this file decides what to quantise and with which Gram:
  dense W (out x in):           GPTQ(W, H), H = the layer input's Gram;
  low-rank W ~ up @ down:       GPTQ(down, H), then GPTQ(up, D H D^T) where D is the *quantised*
                                down, because that is what up really receives.
A low-rank factor's rank is zero-padded to a multiple of the packing unit (8 codes per int32 word
at 4 bits, 32 at 3 bits): zero rows of down and zero columns of up change no output and pack
exactly, so any rank the allocation chose can be quantised. The rank side may then have a partial
last group, which the format allows (g_idx says which group each column is in).

Recipe:
    - method: gptq
      bits: 4
      group_size: 128
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor import models
from compressor.errors import CompressorError, check_choice, check_float, check_patterns
from compressor.methods import register
from compressor.methods.base import Method
from compressor.modules import LowRankLinear, pack_chunk
from compressor.quant import QuantConfig, QuantResult, gptq_quantize, rtn_quantize
from compressor.quant import QuantLinear as BuildableQuantLinear


@dataclass
class GptqConfig:
    """bits: 2, 3, 4 or 8. group_size: input columns sharing a scale (-1: one per output row).
    sym: symmetric grid. act_order: quantise columns by decreasing activation energy (GPTQ's
    desc_act); static_groups: with act_order, keep groups contiguous (g_idx = i // group_size,
    which fast kernels want). damp: fraction of mean(diag H) added to H. targets: glob patterns on
    linear names inside a decoder layer."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    targets: list[str] = field(default_factory=lambda: ["*"])

    def __post_init__(self):
        check_choice("bits", self.bits, BITS)
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or not (self.group_size == -1 or self.group_size >= 1):
            raise CompressorError(f"key 'group_size' must be -1 (one scale per output row) or an integer >= 1 such as 128, got {self.group_size!r}")
        check_float("damp", self.damp, 0, 1, high_open=True)
        check_patterns("targets", self.targets)


BITS = (2, 3, 4, 8)


@register
class Gptq(Method):
    name = "gptq"
    Config = GptqConfig
    kind = "quant"
    needs_gram = True

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.quant = QuantConfig(bits=c.bits, group_size=c.group_size, sym=c.sym, act_order=c.act_order, damp=c.damp, static_groups=c.static_groups)

    def _solve(self, W: torch.Tensor, H: torch.Tensor | None) -> QuantResult:
        return gptq_quantize(W, H, self.quant)

    def format(self) -> dict:
        """The grid, as recorded in specs and in the GPTQ quantization_config."""
        c = self.config
        return {"bits": c.bits, "group_size": c.group_size, "sym": c.sym, "desc_act": c.act_order and not c.static_groups}

    def check(self, shapes: dict[str, tuple[int, int]], lowrank: set[str]) -> None:
        """Fail before any work on a layer the format cannot hold (dense layers are checked; the
        rank side of low-rank factors is padded instead)."""
        g, per = self.config.group_size, pack_chunk(self.config.bits)[0]
        for name, (out_f, in_f) in shapes.items():
            if g != -1 and in_f % g:
                raise CompressorError(f"{self.name}: group_size {g} does not divide the {in_f} input features of {name}; use a divisor of {in_f} or -1 (per output channel)")
            if name not in lowrank and (in_f % per or out_f % per):
                raise CompressorError(f"{self.name}: {self.config.bits}-bit packing needs in and out features divisible by {per}, but {name} is {out_f} x {in_f}; leave it out of 'targets'")

    def quantize_module(self, module: nn.Module, H: torch.Tensor | None, spec: dict | None) -> tuple[nn.Module, dict]:
        """The quantised replacement of `module` and its spec for config.compression."""
        if isinstance(module, LowRankLinear):
            return self._quantize_lowrank(module, H, dict(spec))
        W = models.weight_of(module).detach()
        bias = module.bias.detach() if module.bias is not None else None
        new = BuildableQuantLinear.from_result(self._solve(W, H), self.config.group_size, bias)
        out_f, in_f = W.shape
        spec = {"type": "quant", "out": out_f, "in": in_f, "bias": bias is not None, "bits": self.config.bits, "group_size": self.config.group_size}
        return new, spec

    def _quantize_lowrank(self, module: LowRankLinear, H, spec: dict):
        down, up = module.down.weight.detach(), module.up.weight.detach()
        per = pack_chunk(self.config.bits)[0]
        rank = math.ceil(module.rank / per) * per
        if rank != module.rank:
            down = torch.cat([down, down.new_zeros(rank - module.rank, down.shape[1])])
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - module.rank)], dim=1)
        q_down = self._solve(down, H)
        H_up = None if H is None else self._factor_gram(q_down.w_hat, H)
        q_up = self._solve(up, H_up)
        bias = module.up.bias.detach() if module.up.bias is not None else None
        module.down = BuildableQuantLinear.from_result(q_down, self.config.group_size)
        module.up = BuildableQuantLinear.from_result(q_up, self.config.group_size, bias)
        module.rank = rank
        spec.update(rank=rank, quant={"bits": self.config.bits, "group_size": self.config.group_size})
        return module, spec

    @staticmethod
    def _factor_gram(down: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        D = down.to(device=H.device, dtype=torch.float64)
        return D @ H.to(torch.float64) @ D.T


@register
class Rtn(Gptq):
    """Round-to-nearest on the same grid and format: data-free, the baseline GPTQ must beat."""

    name = "rtn"
    needs_gram = False

    def _solve(self, W, H):
        return rtn_quantize(W, self.quant)

    def _factor_gram(self, down, H):
        return None


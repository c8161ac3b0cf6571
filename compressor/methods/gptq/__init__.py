"""GPTQ (and its round-to-nearest baseline) as a recipe stage, on dense and low-rank layers.

The maths (the column sweep with the inverse-Hessian Cholesky factor, the grid) is in solver.py,
the checkpoint packing in compressor/methods/gptq/format.py; this file decides what to quantise and
with which Gram:
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

import compressor
from compressor import models, modules
from compressor.errors import CompressorError, check_patterns
from compressor.methods import register
from compressor.methods.base import Method, decomposition_cost, target_shapes
from compressor.methods.gptq import format as gptq_v1
from compressor.methods.gptq.solver import QuantConfig, QuantResult, gptq_quantize, rtn_quantize, to_module
from compressor.modules import LowRankLinear, ModuleSpec, pack_chunk


@dataclass
class GptqConfig(QuantConfig):
    """The grid (solver.QuantConfig: bits, group_size, sym, act_order, damp, static_groups), plus
    targets: glob patterns on linear names inside a decoder layer."""

    targets: list[str] = field(default_factory=lambda: ["*"])

    def __post_init__(self):
        super().__post_init__()
        check_patterns("targets", self.targets)


@register
class Gptq(Method):
    name = "gptq"
    Config = GptqConfig
    kind = "quant"
    needs_gram = True

    def _solve(self, W: torch.Tensor, H: torch.Tensor | None) -> QuantResult:
        return gptq_quantize(W, H, self.config)

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
                raise CompressorError(f"{self.name}: group_size {g} does not divide the {in_f} input features of {name}; "
                                      f"use a divisor of {in_f} or -1 (per output channel)")
            if name not in lowrank and (in_f % per or out_f % per):
                raise CompressorError(f"{self.name}: {self.config.bits}-bit packing needs in and out features divisible by {per}, "
                                      f"but {name} is {out_f} x {in_f}; leave it out of 'targets'")

    def prepare(self, run) -> None:
        self.check(target_shapes(run.model, self), {n for n, s in run.plan.items() if s["type"] == "lowrank"})

    def apply(self, work) -> None:
        names = [n for n in work.names if self.does(n)]

        def quantize(batch: list[str]) -> list[tuple[nn.Module, dict]]:
            return [self.quantize_module(work.module(n), work.gram(n), work.run.specs.get(work.full(n))) for n in batch]

        # The executor may quantise some linears on another rank (it hands their modules back on
        # the host): each goes back to the device its linear was on.
        devices = [next(work.module(n).parameters()).device for n in names]
        shapes = {n: tuple(models.linear_shape(work.module(n))) for n in names}
        found = work.run.executor.map_by_cost(quantize, names, lambda n: decomposition_cost(shapes[n]), lambda n: shapes[n], "quantisation")
        found = [(m.to(d), spec) for d, (m, spec) in zip(devices, found)]
        for name, (module, spec) in zip(names, found):
            work.replace(name, module, spec)

    def quantize_module(self, module: nn.Module, H: torch.Tensor | None, spec: ModuleSpec | None) -> tuple[nn.Module, ModuleSpec]:
        """The quantised replacement of `module` and its spec for config.compression."""
        if isinstance(module, LowRankLinear):
            return self._quantize_lowrank(module, H, spec)
        W = models.weight_of(module).detach()
        bias = module.bias.detach() if module.bias is not None else None
        new = to_module(self._solve(W, H), self.config.group_size, bias)
        out_f, in_f = W.shape
        return new, ModuleSpec("quant", out_f, in_f, bias is not None, bits=self.config.bits, group_size=self.config.group_size)

    def _quantize_lowrank(self, module: LowRankLinear, H, spec: ModuleSpec):
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
        module.down = to_module(q_down, self.config.group_size)
        module.up = to_module(q_up, self.config.group_size, bias)
        module.rank = rank
        return module, spec.replace(rank=rank, quant={"bits": self.config.bits, "group_size": self.config.group_size})

    def report(self, model, specs: dict) -> dict:
        c = self.config
        linears = [m for _, _, m in models.iter_linears_any(model)]
        bases = [m.base if isinstance(m, modules.LoraAdapted) else m for m in linears]
        qlayers = [q for m in bases for q in m.modules() if isinstance(q, modules.QuantLinear)]
        sizes = [q.in_features * q.out_features for q in qlayers]
        bits = [gptq_v1.effective_bits(c.bits, c.group_size, q.in_features, q.out_features) for q in qlayers]
        return {
            "quantization": {
                "method": self.name,
                **self.format(),
                "act_order": c.act_order,
                "static_groups": c.static_groups,
                "damp": c.damp,
                # Per quantised weight, as GPTQ papers count it (codes + fp16 scale and zero per group).
                "effective_bits": None if not qlayers else sum(b * n for b, n in zip(bits, sizes)) / sum(sizes),
                "gptq_checkpoint": all(gptq_v1.gptq_only(spec) for spec in specs.values()),
            }
        }

    def summary_lines(self, model, specs: dict, entry: dict) -> list[str]:
        q = entry["quantization"]
        order = ", act-order" if q.get("act_order") else ""
        bits = f", {q['effective_bits']:.2f} bits per weight with scales" if q.get("effective_bits") else ""
        return [f"quantised the decoder linears with {q['method']} to {q['bits']}-bit, group {q['group_size']}{order}{bits}"]

    def export(self, model, specs: dict) -> dict:
        """A GPTQ v1 quantization_config when this stage is the only compression. Low-rank models
        are not declared GPTQ: a GPTQ loader would look for dense layers that are not there."""
        if not all(gptq_v1.gptq_only(spec) for spec in specs.values()):
            return {}
        skipped = [name for name, _, _ in models.iter_linears_any(model) if name not in specs]
        return {"quantization_config": gptq_v1.quantization_config(self.format(), self.config.damp, self.config.static_groups, self.name, skipped,
                                                                   compressor.__version__)}

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
        return rtn_quantize(W, self.config)

    def _factor_gram(self, down, H):
        return None


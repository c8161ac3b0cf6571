"""Block-wise healing: after a layer's compression stages, fit the layer's remaining float weights
so that its output matches the dense layer's on the calibration inputs (local reconstruction, as
in arXiv 2510.14444, which reports it matching LoRA healing with far less data and compute).

The closed forms before it (structured's refit of down_proj, a rank stage's truncation) each fit
one linear to its own input; none sees the whole block (attention + MLP + residual), nor that the
kept gate/up rows could move too. Here the layer is run as a whole with gradients: Adam on the
mean squared error against the dense layer's output, one calibration batch per step.

What is trained: the linears an earlier stage of this recipe changed in the layer (`train:
compressed`: the kept gate/up rows and refitted down_proj of `structured`, both factors of a rank
stage's low-rank modules), or every linear the `targets` patterns match (`train: all`), plus the
layer's norms with `train_norms`. Shapes never change, so exports stay what the earlier stages made.

The target (`target`): `own` (default), the dense layer's output on the compressed model's
inputs (the layer's own error), or `dense`, the dense layer's output on the dense model's inputs
(the driver's dense stream; each layer then also tries to undo what earlier layers' compression
changed in its input). On the demo model (structured 20 %), `own` lowered code and WikiText-2
perplexity a little and `dense` raised both, at 1.5x the time.

It never leaves a layer worse than the closed form it started from: a share of the calibration
batches (`holdout`) is held back from the fit, the weights with the lowest held-out error are
kept (early stop after `patience` evaluations without improvement), and if that error is not
below the starting one, in the layer's own dtype, the starting weights are put back. Later stages
then see the healed layer: its input Grams are collected again (GPTQ on the new weights) and it
is their reference (adapters correct what quantising the healed weights loses).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.errors import CompressorError, check_choice, check_float, check_int, check_patterns
from compressor.methods import register
from compressor.methods.base import Method

log = logging.getLogger("compressor.heal")

TRAIN = ("compressed", "all")
TARGETS = ("dense", "own")


@dataclass
class HealConfig:
    """steps: at most this many optimiser steps per layer (one calibration batch each).
    lr: Adam's learning rate. holdout: share of the calibration batches held back for early stopping
    (at least one batch). eval_every: steps between held-out evaluations. patience: evaluations
    without improvement before the fit stops. seed: batch order and held-out split (per layer: seed + index).
    train: compressed (linears an earlier stage changed) or all (every linear `targets` matches).
    train_norms: also fit the layer's norm weights. target: own (the dense layer on this layer's
    compressed inputs) or dense (the dense layer on the dense model's inputs)."""

    steps: int = 200
    lr: float = 1e-4
    holdout: float = 0.125
    eval_every: int = 10
    patience: int = 3
    seed: int = 0
    train: str = "compressed"
    train_norms: bool = False
    target: str = "own"
    targets: list[str] = field(default_factory=lambda: ["*"])

    def __post_init__(self):
        check_int("steps", self.steps, 1)
        check_float("lr", self.lr, 0, 1, low_open=True)
        check_float("holdout", self.holdout, 0, 1, low_open=True, high_open=True)
        check_int("eval_every", self.eval_every, 1)
        check_int("patience", self.patience, 1)
        check_int("seed", self.seed, 0)
        check_choice("train", self.train, TRAIN)
        if not isinstance(self.train_norms, bool):
            raise CompressorError(f"key 'train_norms' must be true or false, got {self.train_norms!r}")
        check_choice("target", self.target, TARGETS)
        check_patterns("targets", self.targets)


@dataclass
class Fit:
    """One layer's healing, for the report."""

    seconds: float
    steps: int
    before: float  # held-out relative squared error against the target, as the closed forms left it
    after: float  # the same after healing (equal to `before` when the start was kept)
    kept_start: bool  # no fitted state beat the start on the held-out batches
    parameters: int  # values trained

    def entry(self) -> dict:
        return {"seconds": round(self.seconds, 2), "steps": self.steps, "held_out_error_before": _round(self.before),
                "held_out_error_after": _round(self.after), "kept_start": self.kept_start, "parameters": self.parameters}


def _round(x: float) -> float:
    return float(f"{x:.6g}")


@register
class Heal(Method):
    """Fits each compressed layer's float weights to the dense layer's outputs (block-wise)."""

    name = "heal"
    Config = HealConfig
    kind = "heal"
    needs_gram = True  # it needs calibration data (and later stages Grams of the healed layer)
    sets_reference = True  # later stages approximate the healed layer

    def __init__(self, config):
        super().__init__(config)
        self.fits: dict[int, Fit] = {}
        self.regather = False

    def bind(self, stages, calibration) -> None:
        mine = stages.index(self)
        if mine == 0:
            raise CompressorError(f"'{self.name}' fits what an earlier stage compressed; put a structured or rank-reduction stage before it")
        if getattr(calibration, "true_sequential", False):
            raise CompressorError(f"'{self.name}' fits the whole layer once its compression is done; set calibration.true_sequential: false")
        later = stages[mine + 1:]
        others = [s for s in stages if s is not self and s.needs_dense_stream()]
        if others:
            raise CompressorError(f"'{self.name}' changes the inputs later linears see, so '{others[0].name}' cross-Grams would be stale; "
                                  "drop its propagation")
        self.regather = any(s.needs_gram for s in later)

    def needs_layer_io(self) -> bool:
        return True

    def needs_dense_stream(self) -> bool:
        return self.config.target == "dense"

    def apply(self, work) -> None:
        if work.run.executor.ranks > 1:  # each rank holds only its share of the windows
            raise CompressorError(f"'{self.name}' does not run in several processes yet; compress with one process")
        if work.inputs is None:
            raise CompressorError(f"'{self.name}' needs calibration data")
        targets = work.targets if self.config.target == "dense" else work.own_targets
        params = self.parameters(work)
        if not params or len(work.inputs) < 2:
            # Nothing this stage may change here, or too few batches to hold one back.
            if len(work.inputs) < 2:
                log.warning("heal: layer %d left as it is: it needs at least 2 calibration batches (samples / batch_size)", work.index)
            return
        self.fits[work.index] = fit_layer(work.layer, params, work.inputs, work.calls, targets, self.config, work.index)
        log.info("heal layer %d: %s", work.index, self.fits[work.index].entry())
        if self.regather and not self.fits[work.index].kept_start:
            work.regather()

    def parameters(self, work) -> list[nn.Parameter]:
        """The float parameters this stage fits in one layer (never a quantised module's)."""
        chosen: list[nn.Parameter] = []
        for name in work.names:
            if not any(fnmatch.fnmatch(name, pat) for pat in self.config.targets):
                continue
            if self.config.train == "compressed" and work.full(name) not in work.run.specs:
                continue
            module = work.module(name)
            chosen += [p for p in module.parameters() if p.is_floating_point()]
        if self.config.train_norms:
            for module in work.layer.modules():
                if "norm" in type(module).__name__.lower():
                    chosen += [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        seen: set[int] = set()
        return [p for p in chosen if not (id(p) in seen or seen.add(id(p)))]

    def summary_lines(self, model, specs: dict, entry: dict) -> list[str]:
        h = entry.get("heal")
        if not h:
            return []
        healed = len(h["layers"]) - h["layers_kept_start"]
        return [f"healed {healed} of {len(h['layers'])} layers against the {h['target']} layer's outputs "
                f"({h['steps']} optimiser steps, {h['seconds']:.0f} s; the others kept their closed form)"]

    def layer_state(self, index: int) -> dict | None:
        fit = self.fits.get(index)
        return None if fit is None else dataclasses.asdict(fit)

    def load_layer_state(self, index: int, state: dict, tensors: dict) -> None:
        self.fits[index] = Fit(**state)

    def report(self, model, specs: dict) -> dict:
        if not self.fits:
            return {}
        fits = [self.fits[i] for i in sorted(self.fits)]
        return {
            "heal": {
                "target": self.config.target,
                "train": self.config.train,
                "train_norms": self.config.train_norms,
                "max_steps": self.config.steps,
                "lr": self.config.lr,
                "seconds": round(sum(f.seconds for f in fits), 2),
                "steps": sum(f.steps for f in fits),
                "layers_kept_start": sum(f.kept_start for f in fits),
                # per layer: held-out relative squared error of the layer's output against the target, before and after
                "layers": {str(i): self.fits[i].entry() for i in sorted(self.fits)},
            }
        }


# ----------------------------------------------------------------------------- the fit


def _cast(value, dtype: torch.dtype):
    """Floating tensors inside a layer call's arguments (rotary tables, masks) in `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _output(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def held_out_error(layer, batches, inputs, calls, targets, dtype) -> float:
    """sum ||layer(x) - y||^2 / sum ||y - x||^2 over the held-out batches (float64 sums): the error
    relative to what the layer adds to its input, since the residual stream would hide it in ||y||."""
    err = ref = 0.0
    with torch.no_grad():
        for b in batches:
            y = targets[b].double()
            out = _output(layer, inputs[b].to(dtype), _cast(calls[b], dtype))
            err += float((out.double() - y).square().sum())
            ref += float((y - inputs[b].double()).square().sum())
    return err / max(ref, 1e-300)


def fit_layer(layer: nn.Module, params: list[nn.Parameter], inputs, calls, targets, cfg: HealConfig, index: int = 0) -> Fit:
    """Adam on the layer's MSE against `targets` (per batch), over the parameters `params`, with
    early stopping on held-back batches; the layer ends with the best weights found, or its
    starting weights when none beat them on the held-back batches."""
    clock = time.perf_counter()
    dtype = next(layer.parameters()).dtype
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(cfg.seed + index)
    order = torch.randperm(len(inputs), generator=gen).tolist()
    n_hold = min(len(order) - 1, max(1, round(cfg.holdout * len(order))))
    hold, train = order[:n_hold], order[n_hold:]
    before = held_out_error(layer, hold, inputs, calls, targets, dtype)
    # Fit in float32 at least: Adam's small steps vanish in bfloat16 weights.
    work_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    flags = {id(p): p.requires_grad for p in layer.parameters()}
    layer.to(work_dtype)
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    best, best_state, steps, stale = before, None, 0, 0
    try:
        optimiser = torch.optim.Adam(params, lr=cfg.lr)
        # per batch, so each weighs by its relative error (as held_out_error measures it)
        scale = {b: float((targets[b].double() - inputs[b].double()).square().mean()) for b in train}
        picks: list[int] = []
        with torch.enable_grad():
            while steps < cfg.steps:
                if not picks:
                    picks = [train[j] for j in torch.randperm(len(train), generator=gen).tolist()]
                b = picks.pop()
                out = _output(layer, inputs[b].to(work_dtype), _cast(calls[b], work_dtype))
                loss = (out - targets[b].to(work_dtype)).square().mean() / max(scale[b], 1e-30)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                steps += 1
                if steps % cfg.eval_every == 0 or steps == cfg.steps:
                    err = held_out_error(layer, hold, inputs, calls, targets, work_dtype)
                    if err < best:
                        best, best_state, stale = err, [p.detach().clone() for p in params], 0
                    else:
                        stale += 1
                        if stale >= cfg.patience:
                            break
        with torch.no_grad():
            for p, value in zip(params, best_state or start):
                p.copy_(value)
    finally:
        layer.to(dtype)
        for p in layer.parameters():
            p.requires_grad_(flags.get(id(p), False))
    after = before
    if best_state is not None:
        # Measured again in the layer's own dtype: rounding the fit back must not lose the gain.
        after = held_out_error(layer, hold, inputs, calls, targets, dtype)
        if not after < before:
            with torch.no_grad():
                for p, value in zip(params, start):
                    p.copy_(value)
            after = before
    return Fit(time.perf_counter() - clock, steps, before, after, after == before, sum(p.numel() for p in params))

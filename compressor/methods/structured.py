"""Structured MLP-width reduction (the Nyström module of MoDeGPT, arXiv 2408.09632).

A decoder MLP is up/gate -> sigma -> down: every intermediate channel j is one row of gate/up and
one column of down. Keeping k of the I channels leaves smaller *dense* matrices (no factor
overhead, plain GEMMs) and, with the same k in every layer, a standard checkpoint whose config
just says `intermediate_size: k`.

Which channels, and what down becomes: with Z (tokens x I) the intermediate activations on the
calibration data and C = Z^T Z / N (the input Gram of down, which the driver collects anyway), the
kept set S comes from backward elimination (`selection: greedy`: repeatedly drop the channel whose
loss raises the refitted output error least, given the channels still kept), or from a score per
channel: its share of the MLP's output energy, C_jj * ||W_down[:, j]||^2 (`selection: energy`), or
ridge leverage, diag(C (C + lambda I)^-1) (`selection: leverage`, MoDeGPT's choice). down is then
refitted to reproduce the full MLP's output from the kept channels alone, the least-squares solution
    W_down' = W_down C[:, S] C[S, S]^-1,
exact whenever the dropped channels are linear combinations of the kept ones on the data.

Widths: `allocation: uniform` gives every layer the same k (standard export). `allocation: budget`
measures, on the dense model, each layer's relative output error of that refit at every candidate
width (one pivoted Cholesky per layer gives the whole curve) and removes channels where the error
grows least, under the same total parameter budget; the export then records per-layer widths and
loads through the generated shim.

Attention (value-output and key-query reductions) is not done here: in the llama/gemma/qwen
classes q, k, v and o share one `head_dim`, and RoPE's frequencies follow it, so a smaller value or
key head cannot be expressed in the standard architecture.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor import models
from compressor.errors import MAX_DAMP, CompressorError, check_float, check_int, shown
from compressor.methods import register
from compressor.methods.base import Method, resolve_align
from compressor.modules import ModuleSpec
from compressor.ranks import aligned_step

log = logging.getLogger("compressor.structured")

SELECTIONS = ("energy", "leverage", "greedy")
ALLOCATIONS = ("uniform", "budget")


MAX_MULTIPLE = 1 << 16  # a width multiple beyond any MLP


@dataclass
class StructuredConfig:
    """ratio: fraction of ALL decoder-linear parameters to remove, taken from the MLPs.
    allocation: uniform (same width in every layer) or budget (per-layer widths by measured error).
    selection: greedy, energy or leverage (how the kept intermediate channels are chosen).
    multiple_of: widths are multiples of this; default: the rank stages' `align` rule
    (ranks.aligned_step on down_proj's shape: 64, 128 before a quantisation stage, smaller for
    small MLPs, 1 for the test models).
    min_keep: with allocation budget, no layer keeps fewer than this fraction of its channels.
    ridge: leverage's lambda as a fraction of mean(diag C). damp: added to C[S, S] as a fraction of
    its mean diagonal before solving, so unused channels cannot make the refit singular."""

    ratio: float = 0.2
    allocation: str = "uniform"
    selection: str = "greedy"
    multiple_of: int | None = None
    min_keep: float = 0.25
    ridge: float = 1e-2
    damp: float = 1e-6
    targets: list[str] = field(default_factory=lambda: ["mlp.*"])

    def __post_init__(self):
        check_float("ratio", self.ratio, 0, 1, low_open=True, high_open=True)
        if self.allocation not in ALLOCATIONS:
            raise CompressorError(f"structured: allocation must be one of {', '.join(ALLOCATIONS)}, got {shown(self.allocation)}")
        if self.selection not in SELECTIONS:
            raise CompressorError(f"structured: selection must be one of {', '.join(SELECTIONS)}, got {shown(self.selection)}")
        check_int("multiple_of", self.multiple_of, 1, optional=True, most=MAX_MULTIPLE)
        check_float("min_keep", self.min_keep, 0, 1, low_open=True)
        check_float("ridge", self.ridge, 0, most=MAX_DAMP)
        check_float("damp", self.damp, 0, most=MAX_DAMP)
        if self.targets != ["mlp.*"]:
            raise CompressorError("structured: only the MLP width is reduced (targets: ['mlp.*']); attention cannot shrink in the standard classes")


# ----------------------------------------------------------------------------- the maths


def channel_scores(C: torch.Tensor, W_down: torch.Tensor, selection: str = "energy", ridge: float = 1e-2) -> torch.Tensor:
    """Per intermediate channel, how much it matters on its own (higher = keep)."""
    C = C.double()
    if selection == "energy":
        return C.diagonal().clamp_min(0) * W_down.double().square().sum(0)
    lam = ridge * C.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    return torch.linalg.solve(C + lam * eye, C).diagonal()


def _inverse(A: torch.Tensor) -> torch.Tensor:
    """A^-1 of a symmetric positive definite A by Cholesky (half the work of LU), LU if it is not."""
    L, info = torch.linalg.cholesky_ex(A)
    return torch.cholesky_inverse(L) if int(info) == 0 else torch.linalg.inv(A)


def elimination_order(C: torch.Tensor, W_down: torch.Tensor, keep: int, damp: float = 1e-6, max_steps: int = 512, block: int = 64) -> torch.Tensor:
    """Channels, most useful first, by backward elimination: starting from all of them, repeatedly
    drop the channel whose loss raises the refitted output error least, given the others.

    With P = C_A^-1 over the alive set A and B = P C_A W^T the refit's coefficients, dropping j
    costs ||B[j]||^2 / P[j, j] of output energy (the downdate of a least-squares fit). Unlike a
    per-channel score this sees redundancy: of two channels that carry the same signal, one goes
    and the refit moves its weight to the other. At most `max_steps` downdates: with more channels
    to drop, the cheapest few go together. The `keep` survivors come first (by energy), then the
    dropped ones, last dropped first, so every prefix of length >= keep is a set the elimination
    passed through.

    A step needs only B (downdated at once, n x out), P's diagonal and P's rows of the dropped
    channels. So P's downdates are kept as factors, P - U V^T, and applied to P in one matrix
    product every `block` columns, where the alive rows are also compacted: the n x n matrix is
    swept once per block instead of a few times per step, which is what made wide MLPs slow."""
    C, W = C.double(), W_down.double()
    n = C.shape[0]
    shift = damp * C.diagonal().mean().clamp_min(1e-30)
    A = C.clone()
    A.diagonal().add_(shift)
    P = _inverse(A)
    del A
    B = W.T - shift * (P @ W.T)  # P C W^T, as P C = I - shift P: W^T up to the damping
    diag = P.diagonal().clone()
    index = torch.arange(n, device=C.device)  # the channel each row of P and B belongs to
    alive = torch.ones(n, dtype=torch.bool, device=C.device)
    dropped: list[torch.Tensor] = []
    todo = n - keep
    per_step = max(1, math.ceil(todo / max_steps))
    cap = max(block, per_step)
    U = C.new_empty(n, cap)
    V = C.new_empty(n, cap)
    used = 0
    while todo > 0:
        cost = B.square().sum(1) / diag.clamp_min(1e-300)
        cost[~alive] = math.inf
        J = cost.topk(min(per_step, todo), largest=False).indices
        b = len(J)
        if used + b > cap:  # apply the pending downdates to the alive rows and columns only
            on = alive.nonzero().squeeze(1)
            P = P[on][:, on].addmm_(U[on, :used], V[on, :used].T, alpha=-1)
            U, V = U[on], V[on]
            B, diag, index = B[on], diag[on], index[on]
            J = (alive.cumsum(0) - 1)[J]  # the same channels' positions among the alive
            alive = alive[on]
            used = 0
        PJ = P[J].addmm_(U[J, :used], V[:, :used].T, alpha=-1) if used else P[J]  # rows J of the current P
        m = P.shape[0]
        solve = torch.linalg.solve(PJ[:, J], torch.cat([PJ, B[J]], dim=1))  # P_JJ^-1 [P_J. | B_J]
        U[:, used:used + b] = PJ.T
        V[:, used:used + b] = solve[:, :m].T
        used += b
        diag -= (PJ * solve[:, :m]).sum(0)
        B.addmm_(PJ.T, solve[:, m:], alpha=-1)
        dropped.append(index[J])
        alive[J] = False
        todo -= b
    survivors = index[alive]  # still in increasing channel order
    energy = channel_scores(C, W)[survivors]
    first = survivors[energy.argsort(descending=True)]
    rest = torch.cat(dropped[::-1]) if dropped else first.new_zeros(0)
    return torch.cat([first, rest])


def channel_order(C: torch.Tensor, W_down: torch.Tensor, selection: str, keep: int, ridge: float = 1e-2, damp: float = 1e-6) -> torch.Tensor:
    """All channels, most useful first, so that the first k are the set to keep at width k."""
    if selection == "greedy":
        return elimination_order(C, W_down, keep, damp)
    return channel_scores(C, W_down, selection, ridge).argsort(descending=True)


def keep_set(order: torch.Tensor, k: int) -> torch.Tensor:
    """The first k channels of `order`, in their original order (so the kept matrices keep their layout)."""
    return order[:k].sort().values


def refit_down(C: torch.Tensor, W_down: torch.Tensor, kept: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """W_down C[:, S] C[S, S]^-1 in float64: the down_proj that best reproduces the MLP's output
    from the kept channels on the calibration data."""
    return refit_with_error(C, W_down, kept, damp, with_error=False)[0]


def refit_with_error(C: torch.Tensor, W_down: torch.Tensor, kept: torch.Tensor, damp: float = 1e-6, with_error: bool = True) -> tuple[torch.Tensor, float]:
    """(the refitted down_proj, out x k; its relative output error on the calibration data,
    ||Z W^T - Z_S W'^T||^2 / ||Z W^T||^2).

    With R = C[S, :] W^T and (C_SS + s I) W'^T = R (s the damping), the error's middle terms
    collapse: tr(W' C_SS W'^T) = tr(W' R) - s ||W'||^2, so it costs no k x k x out products."""
    C, W = C.double(), W_down.double()
    Css = C[kept][:, kept]
    shift = damp * Css.diagonal().mean().clamp_min(1e-30)
    Css.diagonal().add_(shift)
    R = C[kept] @ W.T  # (k, out) = C[S, :] W^T
    L, info = torch.linalg.cholesky_ex(Css)
    # C symmetric, so (C[:, S] Css^-1)^T = Css^-1 C[S, :]; Cholesky when Css is positive definite
    new = (torch.cholesky_solve(R, L) if int(info) == 0 else torch.linalg.solve(Css, R)).T  # (out, k)
    if not with_error:
        return new, math.nan
    total = (W * (W @ C)).sum()  # tr(W C W^T)
    explained = (new * R.T).sum()
    diff = total - 2 * explained + (explained - shift * new.square().sum())
    return new, float(diff / total.clamp_min(1e-30))


def error_curve(C: torch.Tensor, W_down: torch.Tensor, order: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Relative output error of the refit when keeping the first k channels of `order`, for every k
    in 0..I: err[k] = 1 - explained[k] / total, total = tr(W C W^T).

    With C permuted into `order` and factored L L^T, the output energy the first k channels explain
    is the sum of the first k squared row norms of L^-1 C_p W_p^T (a Gram-Schmidt of the channels in
    that order), so one Cholesky gives the whole curve."""
    C, W = C.double(), W_down.double()
    Cp = C[order][:, order]
    Cp = Cp + damp * Cp.diagonal().mean().clamp_min(1e-30) * torch.eye(len(order), dtype=C.dtype, device=C.device)
    L = torch.linalg.cholesky(Cp)
    G = C[order] @ W.T  # (I, out)
    M = torch.linalg.solve_triangular(L, G, upper=False)
    explained = torch.cat([M.new_zeros(1), M.square().sum(1).cumsum(0)])
    total = (W @ C @ W.T).trace().clamp_min(1e-30)
    return (1 - explained / total).clamp_min(0)


def allocate_widths(curves: list[torch.Tensor], keep_total: int, step: int, floor: int) -> list[int]:
    """Per layer, a width (multiple of `step`, at least `floor`) with the widths summing to at most
    `keep_total`, removing `step` channels at a time where the relative error grows least."""
    widths = [len(c) - 1 for c in curves]
    full = list(widths)
    while sum(widths) > keep_total:
        best, cost = None, math.inf
        for i, (c, w) in enumerate(zip(curves, widths)):
            nxt = w - step if w % step == 0 else w - w % step
            if nxt < floor:
                continue
            delta = float(c[nxt] - c[w])
            if delta < cost:
                best, cost = i, delta
        if best is None:
            raise CompressorError(f"structured: cannot remove that much with min_keep; at most {1 - floor / max(full):.2f} of each MLP's channels go")
        w = widths[best]
        widths[best] = w - step if w % step == 0 else w - w % step
    return widths


# ----------------------------------------------------------------------------- the method


def uniform_width(model, ratio: float, multiple_of: int, who: str = "structured") -> tuple[int, int]:
    """(the MLPs' intermediate width, the width k, a multiple of `multiple_of`, that removes
    `ratio` of ALL decoder-linear parameters when every layer's MLP keeps k channels)."""
    mlp = mlp_layout(model)
    layers = models.decoder_layers(model)
    widths = {models.weight_of(layer.get_submodule(mlp.output)).shape[1] for layer in layers}
    if len(widths) != 1:
        raise CompressorError(f"{who}: the source model's MLP widths differ between layers; start from the original checkpoint")
    (full,) = widths
    first = layers[0]
    # one intermediate channel is a row of each input linear and a column of the output one
    per_channel = sum(models.weight_of(first.get_submodule(n)).shape[1] for n in mlp.inputs) + models.weight_of(first.get_submodule(mlp.output)).shape[0]
    total = sum(math.prod(models.linear_shape(m)) for _, _, m in models.iter_linears(model))
    remove = ratio * total / per_channel  # channels over all layers
    keep_uniform = full - remove / len(layers)
    if keep_uniform < multiple_of:
        raise CompressorError(
            f"{who}: ratio {ratio} would take {remove / (len(layers) * full):.0%} of every MLP's channels; "
            "the MLPs hold too little of the decoder-linear parameters for that ratio, choose a smaller one"
        )
    # down, so the ratio is met; a width within 1e-6 of a step counts as on it, so float rounding
    # (64.0 as 63.99999999999999) or a vanishing ratio does not cost a whole step
    return full, min(full, max(multiple_of, math.floor(keep_uniform / multiple_of + 1e-6) * multiple_of))


def mlp_layout(model) -> models.Mlp:
    arch = models.arch_for(model)
    if arch.mlp is None:
        raise CompressorError(f"structured: no MLP layout known for '{model.config.model_type}'")
    return arch.mlp


def select_rows(module: nn.Module, kept: torch.Tensor) -> nn.Module:
    """A copy of an input linear (gate/up/c_fc) with only the kept output channels."""
    weight = models.weight_of(module).detach()[kept]
    bias = None if module.bias is None else module.bias.detach()[kept]
    return models.new_linear_like(module, weight, bias)


@register
class Structured(Method):
    """Shrinks each MLP's intermediate width; gate/up keep one channel set, down is refitted."""

    name = "structured"
    Config = StructuredConfig
    kind = "structure"
    needs_gram = True
    sets_reference = True  # later stages (GPTQ, adapters) approximate the narrower dense layer

    def __init__(self, config):
        super().__init__(config)
        self.widths: dict[int, int] = {}  # layer index -> planned width
        self.done: dict[int, int] = {}  # layer index -> width applied
        self.intermediate: int | None = None
        self.error: dict[int, float] = {}  # layer index -> relative output error on calibration data
        self.align = resolve_align(None, [])  # bind() sees the whole recipe
        self.multiple_of: int | None = None  # the width step used (config or the align rule)

    def bind(self, stages, calibration) -> None:
        if any(s.kind == "rank" for s in stages):
            raise CompressorError(f"'{self.name}' changes the layer shapes a rank stage plans on; use one of them")
        if calibration.true_sequential:
            raise CompressorError(f"'{self.name}' needs the whole layer's Grams at once; set calibration.true_sequential: false")
        self.align = resolve_align(None, stages)

    def prepare(self, run) -> None:
        model = run.model
        mlp = mlp_layout(model)
        step = self.config.multiple_of or aligned_step(models.weight_of(models.decoder_layers(model)[0].get_submodule(mlp.output)).shape, self.align)
        self.multiple_of = step
        full, k = uniform_width(model, self.config.ratio, step, self.name)
        self.intermediate = full
        L = len(models.decoder_layers(model))
        if self.config.allocation == "uniform":
            self.widths = {i: k for i in range(L)}
            return
        curves: dict[int, torch.Tensor] = {}
        floor = max(step, int(math.ceil(self.config.min_keep * full / step)) * step)

        def visit(i, layer, grams):
            C = grams[models.arch_for(model).linears[mlp.output]]
            W = models.weight_of(layer.get_submodule(mlp.output)).detach().to(C.device)
            order = self._order(C, W, floor)
            curves[i] = error_curve(C, W, order, self.config.damp).cpu()

        run.walk(visit, "structured: error curves")
        got = allocate_widths([curves[i] for i in range(L)], k * L, step, floor)
        self.widths = dict(enumerate(got))
        log.info("structured widths: %s", got)

    def _order(self, C, W, keep):
        return channel_order(C, W, self.config.selection, keep, self.config.ridge, self.config.damp)

    def apply(self, work) -> None:
        """Shrink one layer's MLP in place, record the changed linears' specs and give later stages
        the Grams the changed layer sees (down's input Gram restricted to the kept channels)."""
        specs, work.grams = self.shrink(work.run.model, work.index, work.layer, work.grams)
        work.run.specs.update(specs)

    def shrink(self, model, index: int, layer: nn.Module, grams: dict) -> tuple[dict, dict]:
        mlp = mlp_layout(model)
        arch = models.arch_for(model)
        group = arch.linears[mlp.output]
        C = grams[group]
        down = layer.get_submodule(mlp.output)
        W = models.weight_of(down).detach()
        k = self.widths[index]
        width = W.shape[1]
        self.done[index] = k
        if k >= width:
            self.error[index] = 0.0
            return {}, grams
        kept = keep_set(self._order(C, W.to(C.device), k), k)
        new_down, self.error[index] = refit_with_error(C, W.to(C.device), kept, self.config.damp)
        return narrow_mlp(model, index, layer, grams, kept, new_down.to(W.dtype))

    def finish(self, run) -> None:
        """With one width everywhere the model is its own class with a smaller config: the dense
        specs go and `intermediate_size` says k. Otherwise the specs carry the per-layer shapes."""
        widths = set(self.done.values())
        if len(widths) == 1:
            standard_width(run, widths.pop())

    def report(self, model, specs: dict) -> dict:
        uniform = len(set(self.done.values())) == 1
        return {
            "structured": {
                "allocation": self.config.allocation,
                "selection": self.config.selection,
                "intermediate_size_before": self.intermediate,
                "widths": {str(i): k for i, k in sorted(self.done.items())},
                "multiple_of": self.multiple_of,
                "uniform": uniform,
                "standard_architecture": uniform,
                # Squared output error of each refitted MLP on the calibration data, over its output energy.
                "relative_output_error": {str(i): round(e, 5) for i, e in sorted(self.error.items())},
            }
        }

    def summary_lines(self, model, specs: dict, entry: dict) -> list[str]:
        return width_lines(entry["structured"]["intermediate_size_before"], list(self.done.values()))

    def layer_state(self, index: int) -> dict | None:
        return {"width": self.done[index], "error": self.error[index]} if index in self.done else None

    def load_layer_state(self, index: int, state: dict, tensors: dict) -> None:
        self.done[index], self.error[index] = state["width"], state["error"]


def width_lines(before: int, widths: list[int]) -> list[str]:
    """The summary line of an MLP-width stage."""
    if len(set(widths)) == 1:
        return [f"MLP width {before} -> {widths[0]} in all {len(widths)} layers (standard architecture: loads with plain from_pretrained)"]
    return [f"MLP width {before} -> {min(widths)}..{max(widths)} per layer (loads through the generated shim, trust_remote_code=True)"]


def narrow_mlp(model, index: int, layer: nn.Module, grams: dict | None, kept: torch.Tensor, down_weight: torch.Tensor) -> tuple[dict, dict | None]:
    """Keep the intermediate channels `kept` of one layer's MLP: the input linears lose their other
    rows and the output linear becomes `down_weight` (out x len(kept)). Returns the changed linears'
    dense specs and the Grams as the narrower layer sees them (down's input Gram over the kept
    channels), so later stages of the layer (GPTQ) use the right statistics."""
    mlp = mlp_layout(model)
    prefix = models.layer_prefix(model, index)
    specs = {}
    for name in mlp.inputs:
        module = layer.get_submodule(name)
        models.replace_linear(layer, name, select_rows(module, kept.to(models.weight_of(module).device)))
        specs[f"{prefix}.{name}"] = dense_spec(layer.get_submodule(name))
    down = layer.get_submodule(mlp.output)
    W = models.weight_of(down)
    bias = None if down.bias is None else down.bias.detach()
    models.replace_linear(layer, mlp.output, models.new_linear_like(down, down_weight.to(dtype=W.dtype, device=W.device), bias))
    specs[f"{prefix}.{mlp.output}"] = dense_spec(layer.get_submodule(mlp.output))
    if grams is not None:
        group = models.arch_for(model).linears[mlp.output]
        C = grams[group]
        on = kept.to(C.device)
        grams = {**grams, group: C[on][:, on]}
    return specs, grams


def standard_width(run, k: int) -> None:
    """Every layer's MLP has width k: the model is its own class with `intermediate_size` k, so the
    dense specs go (the export then writes a standard checkpoint)."""
    setattr(run.model.config, mlp_layout(run.model).config_key, k)
    for name in [n for n, s in run.specs.items() if s.type == "dense"]:
        del run.specs[name]


def dense_spec(module: nn.Module) -> ModuleSpec:
    out_f, in_f = models.linear_shape(module)
    return ModuleSpec("dense", out_f, in_f, module.bias is not None)

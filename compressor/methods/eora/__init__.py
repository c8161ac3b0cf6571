"""EoRA compensation adapters as a recipe stage (the maths: fit.py; loss weights: sensitivity.py).

For every linear an earlier stage compressed, dW = W - W_hat, where W is the weight before any
stage touched it and W_hat is what the compressed module really computes (dequantised codes,
up @ down, plus LOST's sparse columns). Adapters B A minimise ||(dW - B A) X|| on the layer's
calibration inputs, so y = W_hat x + B A x.

The adapters either stay separate (written as a PEFT LoRA folder with scale 1) or, with `merge`,
are folded into unquantised low-rank weights, where that is exact: up @ down + B @ A is the
rank r + r_a product [up | B] @ [down ; A].

`rank_allocation: per-type` (or `global`) keeps the adapters' total parameters but moves rank to
where it removes the most output error per parameter: every adapter is fitted at up to 4x its rank,
then components are taken greedily by error removed per parameter (eora.allocate_ranks), between
the layers of each matrix type (q_proj of every layer, ...) or across all modules. A module can end
with rank 0 (no adapter). It needs `sequential: false`, since ranks are chosen once every layer's
error is known.

`weighting: loss` weighs each output channel's error by how much the calibration loss cares about it
(the mean squared loss gradient there, sensitivity.py): the adapters solve
min ||W_d (dW - B A) X|| with W_d = diag(sqrt(D)), i.e. the same truncated SVD of W_d dW Q L^1/2,
with B divided by the weights afterwards. `weighting: loss-full` keeps the whole matrix
G = mean g g^T of those gradients instead of its diagonal (the output side of a Kronecker-factored
Fisher): min ||G^1/2 (dW - B A) X||, the SVD of G^1/2 dW Q L^1/2, with B multiplied by G^-1/2
afterwards. Either costs one forward and backward pass of the dense model per calibration window
before the walk; loss-full also keeps an out x out float64 matrix per adapted linear.

`propagation: 1` also corrects what earlier layers' compression did to this layer's input: the
adapters then aim at the dense model's output X_d W^T instead of X W^T (fit.py; after
QEP, arXiv 2504.09629). The walk carries the dense model's hidden states beside the compressed
ones (one more layer forward per batch, and one more in x in Gram per input). Values between 0
and 1 correct that share of the inherited error; it needs `sequential: true`, since the inputs it
corrects must be the ones the adapted model really sees. `propagation_damp` ridges the correction
(fit.py): without it, directions the calibration inputs barely visit are fitted to noise.

`bits: 4` (2, 3, 4 or 8) quantises the adapters themselves with GPTQ, as the gptq stage does a
low-rank factor: A with the layer's input Gram H, then B with A_hat H A_hat^T, the Gram of what B
really receives. PEFT has no quantised LoRA, so such adapters stay inside the checkpoint
(modules.LoraAdapted under the layer's name; compressor.load and trust_remote_code read them) and the
model is then no GPTQ v1 checkpoint for other loaders.

`refine: N` fits the quantised base and the adapters to each other instead of the adapters to a
fixed base (alternating minimisation of the one output error, as CALDERA, arXiv 2405.18886, and
LoftQ, arXiv 2310.08659, do): B A starts as the rank-r fit to W itself, then N times the gptq stage
quantises W - B A and B A is refitted to W - Q. The grid then only has to hold what the adapters
cannot, so the same rank removes more of the error, at N GPTQ runs per linear instead of one. The
base alone is then no longer a model on its own: it is W minus its top components, rounded, so it
needs `sequential: true` (later layers are calibrated on base plus adapters), a quantisation stage
and no rank stage (it re-quantises dense linears), and uniform ranks. `propagation` enters the
last fit only.

`sequential: false` keeps the adapters out of the calibration walk (later layers are calibrated on
the compressed model without them, as in post-quantisation adapter generation); the compressed base
is then identical to a run without this stage, and one run serves every lower rank by truncation.

Recipe:
    - method: eora
      rank: 32
      rank_pattern: {"mlp.*": 64}
      weighting: loss
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor import models, modules, ranks
from compressor.errors import MAX_DAMP, CompressorError, check_choice, check_float, check_int, check_patterns
from compressor.export import peft
from compressor.export.peft import ADAPTER_DIR
from compressor.methods import of_kind, register
from compressor.methods.base import Method
from compressor.methods.eora import fit as eora
from compressor.methods.eora.sensitivity import output_roots, output_sensitivity, row_weights
from compressor.methods.gptq import Gptq, GptqConfig
from compressor.methods.gptq.solver import check_group_size
from compressor.modules import BITS, LoraAdapted, LowRankLinear, ModuleSpec, QuantLinear, effective_weight, linear_from, pack_chunk

log = logging.getLogger("compressor.eora")
MAX_REFINE = 100  # refinement rounds: each is a GPTQ re-quantisation of every linear

log = logging.getLogger("compressor.eora")


@dataclass
class EoraConfig:
    """rank: adapter rank. rank_pattern: glob on linear names inside a layer -> rank, first match
    wins over `rank`. targets: which compressed linears get adapters. merge: fold into unquantised
    low-rank weights. sequential: adapters feed the next layers' calibration inputs.
    rank_allocation: uniform (each module its rank), per-type or global (same total parameters,
    ranks moved by output error removed per parameter; needs sequential: false).
    weighting: output (plain EoRA: every output channel's error counts alike), loss (weighted
    by the calibration loss's squared gradient at that channel) or loss-full (by the covariance
    of those gradients across channels).
    propagation: share (0 to 1) of the error inherited from earlier compressed layers that the
    adapters also correct (0: each layer's own error only, as plain EoRA). propagation_damp: ridge
    on that correction, as a share of the input Gram's mean eigenvalue (GPTQ's damp).
    bits: quantise the adapters (2, 3, 4 or 8; none: float, written as PEFT LoRA), with
    group_size input columns per scale (-1: one per row).
    refine: rounds of fitting the quantised base and the adapters to each other (0: quantise
    W, then fit the adapters to its error; N: start from the adapters' fit to W itself, then N
    times quantise W - B A and refit B A; the base then needs its adapters)."""

    rank: int = 32
    rank_pattern: dict[str, int] = field(default_factory=dict)
    targets: list[str] = field(default_factory=lambda: ["*"])
    merge: bool = False
    sequential: bool = True
    rank_allocation: str = "uniform"
    weighting: str = "output"
    propagation: float = 0.0
    propagation_damp: float = 0.0
    bits: int | None = None
    group_size: int = 128
    refine: int = 0

    def __post_init__(self):
        check_int("rank", self.rank, 1)
        for pattern, r in self.rank_pattern.items():
            check_int(f"rank_pattern['{pattern}']", r, 1)
        check_patterns("targets", self.targets)
        check_choice("rank_allocation", self.rank_allocation, ALLOCATIONS)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_float("propagation", self.propagation, 0, 1)
        check_float("propagation_damp", self.propagation_damp, 0, most=MAX_DAMP)
        if self.bits is not None:
            check_choice("bits", self.bits, BITS)
        check_group_size(self.group_size)
        check_int("refine", self.refine, 0, most=MAX_REFINE)
        for where, r in [("rank", self.rank)] + [(f"rank_pattern['{p}']", v) for p, v in self.rank_pattern.items()]:
            if r not in VLLM_LORA_RANKS:
                # kept (small ranks serve the tests and the toolkit's own loader) but said: vLLM
                # pads such an adapter to the next size it accepts, which costs what that rank costs
                log.warning("eora: %s %d is none of vLLM's LoRA ranks %s; it serves there padded to %s",
                            where, r, "/".join(map(str, VLLM_LORA_RANKS)), vllm_max_lora_rank([r]))
        # Rules between options of this stage (those with other stages are in Eora.bind).
        c = self
        if c.rank_allocation != "uniform" and (c.sequential or c.merge):
            raise CompressorError(f"eora: rank_allocation: {c.rank_allocation} needs sequential: false and no merge "
                                  "(ranks are chosen after every layer is fitted)")
        if c.refine and (c.merge or c.rank_allocation != "uniform" or not c.sequential):
            raise CompressorError("eora: refine fits the base to each module's final adapters, "
                                  "so it needs rank_allocation: uniform, sequential: true and no merge "
                                  "(the base alone is no model to calibrate later layers on)")
        if c.propagation and not c.sequential:
            raise CompressorError("eora: propagation corrects the inputs the adapted model really sees, so it needs sequential: true")
        if c.bits is not None and (c.merge or c.rank_allocation != "uniform"):
            raise CompressorError("eora: bits quantises adapters as they are fitted, so it needs rank_allocation: uniform and no merge")


ALLOCATIONS = ("uniform", "per-type", "global")
# The ranks vLLM's LoRA serving accepts as max_lora_rank (its kernels are built for these); an
# adapter of rank r loads when max_lora_rank >= r, so other ranks still serve, padded to the next.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256)


def vllm_max_lora_rank(ranks) -> int | None:
    """The smallest max_lora_rank vLLM accepts that holds every rank in `ranks` (None: none does)."""
    top = max(ranks, default=0)
    return next((r for r in VLLM_LORA_RANKS if r >= top), None)
WEIGHTINGS = ("output", "loss", "loss-full")
CAP = 4  # with a non-uniform allocation, a module's adapter can grow to CAP x its nominal rank


@register
class Eora(Method):
    name = "eora"
    Config = EoraConfig
    kind = "adapter"
    needs_gram = True

    def __init__(self, config):
        super().__init__(config)
        # bits: the adapters are quantised as they are fitted, on the gptq stage's grid
        self.quantizer = None if config.bits is None else Gptq(GptqConfig(bits=config.bits, group_size=config.group_size))
        self.base = None  # with refine: the quantisation stage whose work on our targets we do
        self.weights: dict[str, torch.Tensor] = {}  # full name -> loss sensitivity (weighting: loss / loss-full)
        self.fitted: dict[str, tuple] = {}  # full name -> (component energies, nominal rank, shape)
        self.deferred: list[tuple[int, str, str, nn.Module]] = []  # sequential: false, installed in finish (layer index, name, full name, module)
        self.by_layer: dict[int, list[str]] = {}  # layer index -> full names fitted there (for a streamed run's journal)
        self.ranks: dict[str, int] = {}  # full name -> rank of its separate adapter
        self.merged: dict[str, int] = {}  # full name -> adapter rank folded into the low-rank weight
        self.removed: dict[str, float] = {}  # full name -> share of calibration output error the adapter removes

    # --- the driver's interface

    def bind(self, stages, calibration) -> None:
        quant = of_kind(stages, "quant")
        if len(stages) == 1:
            raise CompressorError(f"'{self.name}' compensates a compression error, so it needs a rank-reduction or quantisation stage before it")
        if self.config.refine and (quant is None or of_kind(stages, "rank") is not None):
            raise CompressorError("eora refine re-quantises W - B A for dense linears, "
                                  "so it needs a quantisation stage and no rank-reduction stage; drop 'refine'")
        if self.config.merge and quant is not None:
            raise CompressorError("eora merge: true cannot fold adapters into quantised weights; drop 'merge' to keep them as a PEFT adapter")
        structure = of_kind(stages, "structure")
        if structure is not None and (self.config.weighting != "output" or self.config.propagation > 0):
            raise CompressorError(
                f"after '{structure.name}' the adapters' reference is the narrower dense layer; use eora weighting: output and propagation: 0"
            )
        if self.config.refine:
            self.base = quant
            quant.hand_off(self.targets)  # the base is quantised inside the adapter fit, from W - B A

    def needs_dense_stream(self) -> bool:
        return self.config.propagation > 0

    def needs_reference(self) -> bool:
        return True

    def prepare(self, run) -> None:
        if self.config.weighting != "output":  # measured on the dense model, before any stage changes it
            names = {full for full, name, _ in models.iter_linears(run.model) if self.targets(name)}
            self.weights = output_sensitivity(run.model, run.windows, run.device, names, full=self.config.weighting == "loss-full",
                                              executor=run.executor)

    def apply(self, work) -> None:
        specs = work.run.specs
        for name in work.names:
            if not self.targets(name):
                continue
            full, H, cross = work.full(name), work.gram(name), work.cross(name)
            self._check_rank(work, name, full)
            module = work.module(name)
            fit = None  # (B, A, energies) when the base was fitted together with its adapters
            if self.base is not None and self.base.targets(name):
                def quantize(w, bias=module.bias):  # Conv1D's bias is (out,) too
                    return self.base.quantize_module(modules.linear_from(w, None if bias is None else bias.detach()), H, None)
                module, spec, *fit = self.refined(work.reference[name].to(H.device), quantize, H, self.fit_rank(name), self.weights.get(full), cross)
                work.replace(name, module, spec)
            if full not in specs or specs[full].type == "dense":
                continue
            B, A, energies = fit or self.adapters(work.reference[name].to(H.device), module, H, self.fit_rank(name), self.weights.get(full), cross)
            self.fitted[full] = (energies, min(self.rank_for(name), energies.numel()), tuple(work.reference[name].shape))
            module, specs[full] = self.attach(module, B, A, specs[full], H)
            (self.merged if self.config.merge else self.ranks)[full] = A.shape[0]
            self.by_layer.setdefault(work.index, []).append(full)
            if self.config.sequential or self.config.merge:
                work.replace(name, module)
            else:
                self.deferred.append((work.index, name, full, module))

    def finish(self, run) -> None:
        home = next(run.model.parameters()).device
        final = self.allocate(self.fitted)
        for index, name, full, module in self.deferred:
            layer = models.decoder_layers(run.model)[index]
            if isinstance(module, tuple):  # an interrupted streamed run's adapter, back from its journal
                B, A = module
                module = LoraAdapted.from_factors(layer.get_submodule(name), B, A, A.device, A.dtype)
            if final[full] != self.ranks[full]:
                module = truncate(module, final[full])
                if final[full]:
                    self.ranks[full] = final[full]
                else:
                    del self.ranks[full]
            if isinstance(module, LoraAdapted):  # only the adapters move: the base is where its layer put it
                module.lora_A.to(home)
                module.lora_B.to(home)
            models.replace_linear(layer, name, module)
        self.deferred = []
        self.removed = {n: eora.removed_share(e, final[n]) for n, (e, _, _) in self.fitted.items()}

    def report(self, model, specs: dict) -> dict:
        if not (self.ranks or self.merged):
            return {}
        adapted = peft.adapted(model)
        quantized = bool(adapted) and all(isinstance(m.lora_A, QuantLinear) for m in adapted.values())
        return {
            "adapters": {
                "method": self.name,
                "merged": bool(self.merged),
                "ranks": self.merged or self.ranks,
                "params": sum(m.lora_A.in_features * m.lora_A.out_features + m.lora_B.in_features * m.lora_B.out_features for m in adapted.values()),
                "bits": self.config.bits if quantized else None,
                "path": None if self.merged or quantized else ADAPTER_DIR,
                # Squared output error on the calibration data, per module: how much of it rank r removes.
                "error_removed": {n: round(v, 4) for n, v in self.removed.items()},
                "error_removed_mean": round(sum(self.removed.values()) / len(self.removed), 4) if self.removed else None,
            },
            # what vLLM's --max-lora-rank must be for the PEFT adapter (None: above what it accepts)
            "adapter_serving": {"vllm_max_lora_rank": vllm_max_lora_rank((self.merged or self.ranks).values())},
        }

    def summary_lines(self, model, specs: dict, entry: dict) -> list[str]:
        a = entry.get("adapters")
        if not a:
            return []
        ranks = sorted(set(a["ranks"].values()))
        where = "merged into the weights" if a.get("merged") else (f"PEFT LoRA folder {a['path']}/" if a.get("path") else "quantised, in the checkpoint")
        removed = f", removing {a['error_removed_mean']:.0%} of their output error on calibration data" if a.get("error_removed_mean") is not None else ""
        return [f"{a['method']} adapters of rank {'/'.join(map(str, ranks))} on {len(a['ranks'])} linears ({a['params']:,} parameters, {where}){removed}"]

    def export(self, model, specs: dict) -> dict:
        # refine quantised W - B A: the base is then no model without its adapters
        return {"adapter_required": bool(self.config.refine)}

    def stream_refusal(self) -> str | None:
        if self.config.weighting != "output":
            return (f"weighting: {self.config.weighting} measures the loss gradient with a backward pass through the whole model, "
                    "which a streamed run never holds; use weighting: output")
        return None

    def layer_state(self, index: int) -> dict | None:
        names = self.by_layer.get(index)
        if not names:
            return None
        tensors = {f"{full}.energies": self.fitted[full][0] for full in names if full in self.fitted}
        deferred = []
        for i, name, full, module in self.deferred:
            if i == index:
                deferred.append([name, full])
                tensors[f"{full}.A"], tensors[f"{full}.B"] = module.lora_A.weight.detach(), module.lora_B.weight.detach()
        # Lists of pairs, not mappings: the journal's JSON sorts keys, and the report lists modules
        # in the order they were fitted.
        return {
            "names": names,
            "ranks": [[n, self.ranks[n]] for n in names if n in self.ranks],
            "merged": [[n, self.merged[n]] for n in names if n in self.merged],
            "fitted": [[n, self.fitted[n][1], *self.fitted[n][2]] for n in names if n in self.fitted],
            "deferred": deferred,
            "tensors": tensors,
        }

    def load_layer_state(self, index: int, state: dict, tensors: dict) -> None:
        self.by_layer[index] = list(state["names"])
        self.ranks.update(dict(state["ranks"]))
        self.merged.update(dict(state["merged"]))
        for full, rank, out_f, in_f in state["fitted"]:
            self.fitted[full] = (tensors[f"{full}.energies"], rank, (out_f, in_f))
        for name, full in state["deferred"]:
            self.deferred.append((index, name, full, (tensors[f"{full}.B"], tensors[f"{full}.A"])))

    def _check_rank(self, work, name: str, full: str) -> None:
        """A rank beyond every targeted matrix of the layer means nothing (100000: full-rank adapters,
        an output larger than dense) and is refused, as ranks.fixed refuses an svd rank. A rank
        beyond only some of them (rank 32 on the 16-row k_proj of a small GQA model) is clamped to
        their full rank, as before, but said once per run instead of silently."""
        rank, shape = self.rank_for(name), tuple(work.reference[name].shape)
        if rank <= min(shape):
            return
        largest = max(min(work.reference[n].shape) for n in work.names if self.targets(n))
        if rank > largest:
            raise CompressorError(f"eora rank {rank} is larger than {full} allows (shape {shape[0]}x{shape[1]}, max {min(shape)}) "
                                  f"and than any matrix of its layer (max {largest}); lower 'rank' (or its rank_pattern) in the recipe")
        if not getattr(self, "_clamp_said", False):
            self._clamp_said = True
            log.warning("eora rank %d is larger than %s allows (shape %dx%d); its adapter, and that of any such matrix, gets full rank %d",
                        rank, full, shape[0], shape[1], min(shape))

    # --- the maths

    def rank_for(self, linear_name: str) -> int:
        return next((r for pat, r in self.config.rank_pattern.items() if fnmatch.fnmatch(linear_name, pat)), self.config.rank)

    def fit_rank(self, linear_name: str) -> int:
        """The rank adapters are fitted at: the nominal rank, or the most an allocation may give."""
        r = self.rank_for(linear_name)
        return r if self.config.rank_allocation == "uniform" else CAP * r

    def adapters(self, original: torch.Tensor, module: nn.Module, H: torch.Tensor, rank: int, sensitivity: torch.Tensor | None = None,
                 cross: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B (out x r), A (r x in)) for the error of `module` against `original`, and the energies
        of all its components (eora.eora_fit). sensitivity: the module's D (out,) or G (out x out)
        when weighting by the loss; the energies are then loss-weighted too. cross: K = X_d^T X / N
        for `propagation` (the dense model's inputs against this layer's)."""
        dW = original.to(torch.float64) - effective_weight(module).to(device=original.device, dtype=torch.float64)
        return self._fit(dW, original, H, rank, sensitivity, cross)

    def refined(self, original: torch.Tensor, quantize, H: torch.Tensor, rank: int, sensitivity: torch.Tensor | None = None,
                cross: torch.Tensor | None = None):
        """`refine` rounds of alternating minimisation of the same output error over the quantised
        base Q and the adapters B A (as CALDERA, arXiv 2405.18886, does with LDLQ): B A starts as
        the adapters' best rank-r fit to W itself, then each round quantises W - B A
        (quantize: weight -> (module, spec)) and refits B A to W - Q. Starting from W's own top
        components, rather than from the plain GPTQ error, lets the low-rank part hold the weight
        structure the grid would round worst. With `propagation`, the final fit also aims at the dense
        model's output (cross), once. Returns (module, spec, B, A, energies)."""
        if self.config.refine < 1:
            raise CompressorError("eora: refined() runs the refine rounds; with refine: 0 quantise first and call adapters()")
        # The propagation target enters the last fit only: were it in every fit, each round's base
        # would round away the correction the adapters made for it, and the next fit would add it again.
        B, A, _ = self._fit(original.to(torch.float64), original, H, rank, sensitivity, None)
        for round_ in range(1, self.config.refine + 1):
            shifted = original.to(torch.float64) - B.to(torch.float64) @ A.to(torch.float64)
            module, spec = quantize(shifted.to(original.dtype))
            B, A, energies = self.adapters(original, module, H, rank, sensitivity, cross if round_ == self.config.refine else None)
        return module, spec, B, A, energies

    def _fit(self, dW: torch.Tensor, original: torch.Tensor, H: torch.Tensor, rank: int, sensitivity, cross):
        # q/k/v (and gate/up) share one Gram (and cross-Gram) object: decompose it, and form K - H, once.
        if getattr(self, "_eigen_of", None) is not H:
            self._eigen_of, self._eigen = H, eora.gram_eigen(H.to(original.device))
        drift = None
        if cross is not None and self.config.propagation:
            if getattr(self, "_shift_of", None) is not cross:
                self._shift_of, self._shift = cross, cross.to(original.device, torch.float64) - H.to(original.device, torch.float64)
            drift = self.config.propagation * (original.to(torch.float64) @ self._shift)
        if sensitivity is None:
            return eora.eora_fit(dW, H, rank, eigen=self._eigen, drift=drift, damp=self.config.propagation_damp)
        # Weighting the output side: fit weight @ error, then undo the weight on B.
        if sensitivity.dim() == 1:
            w = row_weights(sensitivity).to(dW.device)[:, None]
            weigh, unweigh = (lambda M: w * M), (lambda B: B / w)
        else:
            root, inv_root = (m.to(dW.device) for m in output_roots(sensitivity))
            weigh, unweigh = (lambda M: root @ M), (lambda B: inv_root @ B)
        B, A, energies = eora.eora_fit(weigh(dW), H, rank, eigen=self._eigen, drift=None if drift is None else weigh(drift), damp=self.config.propagation_damp)
        return unweigh(B.to(torch.float64)).to(B.dtype), A, energies

    def attach(self, module: nn.Module, B: torch.Tensor, A: torch.Tensor, spec: dict, H: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
        """The module with its adapters: merged (spec's rank grows), wrapped, or quantised (with
        the layer's input Gram H) and wrapped."""
        like = next(iter(module.parameters()), None)
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
        if self.config.merge:
            return _merge(module, B.to(dtype), A.to(dtype), spec)
        device = B.device if like is None else like.device
        wrapped = LoraAdapted.from_factors(module, B, A, device, dtype)
        if self.quantizer is None:
            return wrapped, spec
        return self._quantize(wrapped, H, spec)

    def _quantize(self, wrapped: LoraAdapted, H: torch.Tensor, spec: dict) -> tuple[LoraAdapted, dict]:
        out_f, in_f = wrapped.out_features, wrapped.in_features
        per = pack_chunk(self.config.bits)[0]
        if in_f % per or out_f % per:
            raise CompressorError(f"eora: {self.config.bits}-bit adapters need the layer's in and out features divisible by {per}, "
                                  f"got {out_f} x {in_f}; drop 'bits' or leave the layer out of 'targets'")
        rank = wrapped.lora_A.out_features
        pair = LowRankLinear(in_f, out_f, rank)
        pair.down, pair.up = wrapped.lora_A, wrapped.lora_B
        pair, factors = self.quantizer.quantize_module(pair, H, ModuleSpec("lowrank", out_f, in_f, False, rank=rank))
        # the rank may have grown by zero rows to the packing unit
        adapter = {"rank": factors.rank, **factors.quant}
        return LoraAdapted(wrapped.base, pair.down, pair.up), spec.replace(adapter=adapter)

    def allocate(self, fitted: dict[str, tuple[torch.Tensor, int, tuple[int, int]]]) -> dict[str, int]:
        """Per full module name, its final adapter rank; fitted: name -> (energies, nominal rank, (out, in))."""
        if self.config.rank_allocation == "uniform":
            return {n: r for n, (_, r, _) in fitted.items()}
        pools = {n: ranks.matrix_type(n) if self.config.rank_allocation == "per-type" else "all" for n in fitted}
        return eora.allocate_ranks({n: e for n, (e, _, _) in fitted.items()}, {n: sum(s) for n, (_, _, s) in fitted.items()},
                                   {n: r for n, (_, r, _) in fitted.items()}, pools, {n: CAP * r for n, (_, r, _) in fitted.items()})


def truncate(module: LoraAdapted, rank: int) -> nn.Module:
    """The adapted module with its top `rank` adapter components (the base alone for rank 0)."""
    if rank == 0:
        return module.base
    A, B = module.lora_A.weight, module.lora_B.weight
    return LoraAdapted.from_factors(module.base, B[:, :rank], A[:rank], A.device, A.dtype)


def _merge(module: nn.Module, B: torch.Tensor, A: torch.Tensor, spec: dict):
    if not isinstance(module, LowRankLinear) or isinstance(module.down, QuantLinear):
        raise CompressorError("eora: merge: true folds adapters into unquantised low-rank weights only; drop 'merge' to keep them as a PEFT adapter")
    with torch.no_grad():
        module.down = linear_from(torch.cat([module.down.weight, A]))
        module.up = linear_from(torch.cat([module.up.weight, B], dim=1), module.up.bias)
    module.rank = module.down.out_features
    return module, spec.replace(rank=module.rank)

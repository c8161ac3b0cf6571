"""`--target-size` / `--target-bits`: one byte budget, spent per linear where the model loses least.

Every decoder linear can be stored in several ways (options.py): GPTQ at 3, 4 or 8 bits (2 on
request), each with an optional float EoRA adapter of rank 0, 8, 16, 32 or 64. The stage runs in three steps.

1. Price (prepare: one walk over the dense model). Each linear is quantised at every bit width,
   with its own input Gram. Each option's loss-weighted output error comes from that actual result
   (options.py), and its cost is the exact bytes it writes.
2. Decide. One option per linear (per fused group: see below) minimises the summed estimated
   loss under the budget. This is a multiple-choice knapsack, solved exactly (knapsack.py), so the
   output is never larger than the target. The uniform allocations within the same option set
   (what gptq3/4/8 and gptq4 + rank-r adapters give) are priced with the same estimate. When one
   that fits would be estimated better than the chosen allocation (possible only through the
   solver's cost rounding), it is used instead, and the report says so.
3. Apply (the compressing walk, layer-sequential as every stage is). Each linear is quantised at its
   chosen bits against the Gram of the inputs the compressed model really gives it. The adapter
   is then fitted to that result's error, with the same loss weights. The error each linear
   really has there is recorded beside the estimate from step 1, so the report shows how much
   layer-sequential reality moved it.

Fused groups (tie_fused: true, the default): q/k/v share an input, and so do gate/up, and vLLM
runs each group as one fused GPTQ layer that needs one bit width. These linears are therefore one
item with one (bits, rank) choice, and the mixed-bit export can be declared with one `dynamic` rule
per group (docs/guides/mixed-bits.md).

Budget (the CLI's --target-size / --target-bits set it; recipes/target.yaml is this stage alone):
    size: bytes of the output's weights (every *.safetensors file, adapter included), given as
        a number of bytes, "700MB" / "1.2GB" / "900MiB", or relative to the dense model in the
        output dtype: "0.75x" or "75%";
    bits_per_weight: bits per decoder-linear weight, counting everything stored for it (codes,
        scales, zeros, g_idx, bias, adapter factors).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

import compressor
from compressor import models
from compressor.errors import MAX_COUNT, CompressorError, check_choice, check_int, check_patterns, shown
from compressor.export import peft
from compressor.export.peft import ADAPTER_DIR
from compressor.methods import register
from compressor.methods.allocate import knapsack
from compressor.methods.allocate.budget import HEADER_PER_FILE, HEADER_PER_TENSOR, parse_size, size_text
from compressor.methods.allocate.options import Option, errors_by_rank, gram_root, option_bytes, output_error, packable, spectrum_energies
from compressor.methods.base import Method
from compressor.methods.eora import fit as eora
from compressor.methods.eora import vllm_max_lora_rank
from compressor.methods.eora.sensitivity import output_sensitivity, row_weights
from compressor.methods.gptq import Gptq, GptqConfig
from compressor.methods.gptq import format as gptq_v1
from compressor.methods.gptq.solver import check_group_size, gptq_widths
from compressor.modules import BITS, LoraAdapted, effective_weight

log = logging.getLogger("compressor.allocate")

WEIGHTINGS = ("loss", "output")
MIXES = ("adjacent", "any")
MAX_RANK = 1024
@dataclass
class AllocateConfig:
    """size / bits_per_weight: the budget (exactly one; see the module docstring). bits: the GPTQ
    widths to choose from. ranks: the adapter ranks to choose from (0: no adapter). group_size,
    sym, act_order, damp: the GPTQ grid (solver.QuantConfig), the same for every width.
    weighting: loss (output errors weighted by the calibration loss's squared gradient, so errors of
    different linears compare; one forward and backward pass of the dense model per window, over
    the first `sensitivity_samples` calibration windows) or output (plain output error).
    pricing_samples: the calibration windows whose Grams price the options (the first ones; the
    compressing walk uses them all). mix: adjacent (the default: every linear takes one of two
    neighbouring widths, the widest whose uniform allocation fits the budget and the next one up)
    or any (every width in `bits`). tie_fused: one choice for q/k/v and one for gate/up of
    each layer (what vLLM's fused layers need). targets: glob patterns on linear names in a layer."""

    size: int | str | None = None
    bits_per_weight: float | None = None
    # not 2 bits: every demo allocation with 2-bit linears measured worse than uniform 3-bit (results.md)
    bits: list[int] = field(default_factory=lambda: [3, 4, 8])
    ranks: list[int] = field(default_factory=lambda: [0, 8, 16, 32, 64])
    group_size: int = 128
    sym: bool = True
    act_order: bool = True
    damp: float = 0.01
    weighting: str = "loss"
    sensitivity_samples: int = 8
    pricing_samples: int = 16
    # adjacent: left free, the per-linear estimate traded 3-bit linears for 8-bit ones and measured
    # worse than uniform GPTQ at fewer bits (docs/results/results.md#target-size)
    mix: str = "adjacent"
    tie_fused: bool = True
    targets: list[str] = field(default_factory=lambda: ["*"])

    def __post_init__(self):
        if self.size is not None:
            parse_size(self.size)
        if self.bits_per_weight is not None:
            b = self.bits_per_weight
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 32 or not math.isfinite(b):
                raise CompressorError(f"key 'bits_per_weight' must be a number of bits in (0, 32], e.g. 3.5, got {shown(b)}")
        if not isinstance(self.bits, list) or not self.bits or len(set(self.bits)) != len(self.bits):
            raise CompressorError(f"key 'bits' must be a list of distinct widths from {list(BITS)}, got {shown(self.bits)}")
        for b in self.bits:
            check_choice("bits", b, BITS)
        if not isinstance(self.ranks, list) or not self.ranks or len(set(self.ranks)) != len(self.ranks):
            raise CompressorError(f"key 'ranks' must be a list of distinct adapter ranks such as [0, 8, 16, 32, 64], got {shown(self.ranks)}")
        for r in self.ranks:
            if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= MAX_RANK:
                raise CompressorError(f"key 'ranks' holds {shown(r)}; each rank must be an integer in [0, {MAX_RANK}] (0: no adapter)")
        check_group_size(self.group_size)
        GptqConfig(bits=self.bits[0], group_size=self.group_size, sym=self.sym, act_order=self.act_order, damp=self.damp)  # validates the grid
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_int("sensitivity_samples", self.sensitivity_samples, 1, most=MAX_COUNT)
        check_int("pricing_samples", self.pricing_samples, 1, most=MAX_COUNT)
        check_choice("mix", self.mix, MIXES)
        if not isinstance(self.tie_fused, bool):
            raise CompressorError(f"key 'tie_fused' must be true or false, got {shown(self.tie_fused)}")
        check_patterns("targets", self.targets)
        # last, so that a bad value of any key is named before a missing budget
        if (self.size is None) == (self.bits_per_weight is None):
            raise CompressorError("allocate needs exactly one budget: size (e.g. 700MB or 0.75x; --target-size) "
                                  "or bits_per_weight (e.g. 3.5; --target-bits)")

    def options(self) -> list[Option]:
        """Every (bits, rank) pair, cheapest first within a width (the solver keeps the first of equals)."""
        return [Option(b, r) for b in sorted(self.bits) for r in sorted(self.ranks)]


@dataclass
class Item:
    """One choice of the allocation: a linear, or a fused group of a layer's linears."""

    key: str  # e.g. "model.layers.3.self_attn.(q_proj|k_proj|v_proj)"
    members: list[str]  # full names
    options: list[Option]
    costs: list[int]  # bytes per option
    errors: list[float]  # estimated error per option (summed over members)


@register
class Allocate(Method):
    name = "allocate"
    Config = AllocateConfig
    kind = "quant"
    needs_gram = True

    def __init__(self, config):
        super().__init__(config)
        self.items: list[Item] = []
        self.allocation: dict[str, Option] = {}  # full name -> its option
        self.estimated: dict[str, float] = {}  # full name -> estimated error of its option (dense inputs)
        self.realised: dict[str, float] = {}  # full name -> the same error on the compressed model's inputs
        self.budget_bytes = 0
        self.room = 0
        self.planned_bytes = 0
        self.fixed_bytes = 0  # bytes of every tensor the stage does not choose for (embeddings, norms, ...)
        self.header_bytes = 0  # room kept for the safetensors headers
        self.dense_bytes = 0
        self.dense_linear_weights = 0
        self.uniform: list[dict] = []
        self.widths: list[int] = sorted(config.bits)  # the widths the allocation mixes (mix: adjacent keeps two)
        self.fell_back: str | None = None
        self.weights: dict[str, torch.Tensor] = {}  # full name -> loss sensitivity D of its outputs (weighting: loss)
        self.by_layer: dict[int, list[str]] = {}  # layer index -> full names applied there (a streamed run's journal)

    # --- recipe time

    def bind(self, stages, calibration) -> None:
        if len(stages) > 1:
            raise CompressorError("allocate chooses every linear's bits and adapter rank itself, so it must be the recipe's only stage; "
                                  f"drop {', '.join(s.name for s in stages if s is not self)}")

    def stream_refusal(self) -> str | None:
        if self.config.weighting == "loss":
            return ("weighting: loss measures the loss gradient with a backward pass through the whole model, which a streamed run never holds; "
                    "use weighting: output")
        return None

    # --- step 1 and 2: price every option, then choose

    def check_model(self, model, store_dtype) -> dict:
        """The items, their costs and the room the budget leaves, from shapes alone (a budget that
        cannot be met raises here, before any calibration); returns the targeted linears."""
        cfg = self.config
        value_bytes = torch.empty((), dtype=store_dtype).element_size()
        targeted = {full: (local, module) for full, local, module in models.iter_linears(model) if self.targets(local)}
        if not targeted:
            raise CompressorError(f"allocate: targets {cfg.targets} match no linear layer; names look like {next(iter(models.arch_for(model).linears))}")
        shapes = {full: tuple(models.linear_shape(m)) for full, (_, m) in targeted.items()}
        biased = {full: getattr(m, "bias", None) is not None for full, (_, m) in targeted.items()}
        self.items = self._items(model, targeted, shapes)
        for item in self.items:
            item.costs = [sum(option_bytes(*shapes[m], o, cfg.group_size, value_bytes, biased[m]) for m in item.members) for o in item.options]
        self._budget(model, targeted, shapes, value_bytes)
        if cfg.mix == "adjacent":
            self._keep_adjacent()
        return targeted

    def prepare(self, run) -> None:
        cfg = self.config
        model = run.model
        targeted = self.check_model(model, run.store_dtype)
        if cfg.weighting == "loss":
            # A mean of squared gradients over tokens: a few thousand tokens rank the channels, and
            # each window costs a forward and backward pass through the whole model (the
            # embedding and head included), the most expensive step of the stage on a CPU.
            windows = run.windows[: cfg.sensitivity_samples]
            self.weights = output_sensitivity(model, windows, run.device, set(targeted), executor=run.executor)

        per_linear: dict[str, dict[Option, float]] = {}

        def price(index, layer, grams):
            prefix = models.layer_prefix(model, index)
            arch = models.arch_for(model)
            roots = {}
            for local, module in models.layer_linears(model, layer).items():
                full = f"{prefix}.{local}"
                if full not in targeted:
                    continue
                H = grams[arch.linears[local]]
                group = arch.linears[local]
                if group not in roots:
                    roots[group] = gram_root(H)
                W = models.weight_of(module).detach().float()
                weight = row_weights(self.weights[full]) if full in self.weights else None
                found = {}
                widths = sorted({o.bits for o in self._options_of(full)})
                for b, q in gptq_widths(W, H, self._grid(widths[0]), widths).items():
                    energies, total = spectrum_energies(W - q, H, roots[group], weight)
                    ranks = sorted({o.rank for o in self._options_of(full) if o.bits == b})
                    found.update({Option(b, r): e for r, e in zip(ranks, errors_by_rank(energies, ranks, total))})
                per_linear[full] = found

        # Prices rank options against each other, so fewer windows than the compressing walk
        # serve; this walk costs a GPTQ sweep of every width per linear (gptq_widths: one for all).
        run.walk(price, "allocate: pricing each linear's options", True, samples=cfg.pricing_samples)
        per_linear = run.executor.merge_layers(per_linear, "option prices")
        for item in self.items:
            item.errors = [sum(per_linear[m][o] for m in item.members) for o in item.options]

        picked = knapsack.solve([list(zip(it.costs, it.errors)) for it in self.items], self.room)
        chosen = {it.key: k for it, k in zip(self.items, picked)}
        self._check_uniform(chosen)
        for item in self.items:
            k = chosen[item.key]
            for m in item.members:
                self.allocation[m] = item.options[k]
                self.estimated[m] = per_linear[m][item.options[k]]
        self.planned_bytes = self.fixed_bytes + sum(it.costs[chosen[it.key]] for it in self.items)
        run.plan.update({m: {"type": "quant", "bits": o.bits} for m, o in self.allocation.items()})
        log.info("allocate: %s", self._describe())

    def _grid(self, bits: int) -> GptqConfig:
        c = self.config
        return GptqConfig(bits=bits, group_size=c.group_size, sym=c.sym, act_order=c.act_order, damp=c.damp)

    def _options_of(self, full: str) -> list[Option]:
        return next(it.options for it in self.items if full in it.members)

    def _items(self, model, targeted: dict, shapes: dict) -> list[Item]:
        """The allocation's items: fused groups (tie_fused) or single linears, each with the
        options every member can take (packable widths; ranks within every member's shape)."""
        arch = models.arch_for(model)
        groups: dict[str, list[str]] = {}
        for full, (local, _) in targeted.items():
            prefix = full[: -len(local) - 1]
            key = f"{prefix}.{arch.linears[local]}" if self.config.tie_fused else full
            groups.setdefault(key, []).append(full)
        items = []
        g = self.config.group_size
        for key, members in groups.items():
            options = [o for o in self.config.options()
                       if all(packable(o.bits, *shapes[m]) and (g == -1 or shapes[m][1] % g == 0) and o.rank <= min(shapes[m]) for m in members)]
            if not options:
                m = members[0]
                raise CompressorError(f"allocate: no option fits {m} ({shapes[m][0]}x{shapes[m][1]}): its widths need in and out features "
                                      f"divisible by 32 (3-bit) or 16 (2/4/8-bit) and by group_size {g}; leave it out of 'targets'")
            locals_ = [m[len(key.rsplit('.', 1)[0]) + 1:] if self.config.tie_fused else m for m in members]
            label = key if not self.config.tie_fused or len(members) == 1 else f"{key.rsplit('.', 1)[0]}.({'|'.join(locals_)})"
            items.append(Item(label if len(members) > 1 else members[0], members, options, [], []))
        return items

    def _budget(self, model, targeted: dict, shapes: dict, value_bytes: int) -> None:
        """self.room: the bytes the targeted linears may take; fixed_bytes: what the rest of the
        output weighs (every other tensor, written once, plus room for the files' headers)."""
        cfg = self.config
        skip = {f"{full}.{p}" for full in targeted for p in ("weight", "bias")}
        fixed, seen, count = 0, set(), 0
        for name, t in model.state_dict(keep_vars=True).items():
            if name in skip or id(t) in seen:
                continue
            seen.add(id(t))  # a tied embedding and head are written once
            fixed += t.numel() * (value_bytes if t.is_floating_point() else t.element_size())
            count += 1
        per_linear_tensors = 4 + 1 + 2  # qweight, qzeros, scales, g_idx, bias; adapter A and B
        headers = HEADER_PER_FILE * (len(models.decoder_layers(model)) + 3) + HEADER_PER_TENSOR * (count + per_linear_tensors * len(targeted))
        self.fixed_bytes, self.header_bytes = fixed, headers
        self.dense_linear_weights = sum(o * i for o, i in shapes.values())
        self.dense_bytes = fixed + sum(o * i * value_bytes + (o * value_bytes if targeted[f][1].bias is not None else 0) for f, (o, i) in shapes.items())
        cheapest = sum(min(it.costs) for it in self.items)
        if cfg.bits_per_weight is not None:
            # bits per decoder-linear weight: the linears' own bytes, whatever the rest weighs
            self.room = int(cfg.bits_per_weight * self.dense_linear_weights // 8)
            self.budget_bytes = self.fixed_bytes + self.header_bytes + self.room
            if self.room < cheapest:
                least = math.ceil(cheapest * 8 / self.dense_linear_weights * 100) / 100
                raise CompressorError(f"--target-bits {cfg.bits_per_weight} is below the fewest bits per weight these options store: {least:.2f} "
                                      f"(every linear at {min(cfg.bits)} bits with its scales, zeros and g_idx); ask for at least {least:.2f}")
            return
        kind, amount = parse_size(cfg.size)
        self.budget_bytes = int(amount * self.dense_bytes) if kind == "relative" else int(amount)
        self.room = self.budget_bytes - self.fixed_bytes - self.header_bytes
        if self.room < cheapest:
            least = self.fixed_bytes + self.header_bytes + cheapest
            kept = size_text(self.fixed_bytes + self.header_bytes)
            raise CompressorError(f"--target-size {cfg.size} is {size_text(self.budget_bytes)}, below the smallest this model can be with these options: "
                                  f"{size_text(least)} ({kept} of embeddings, norms and other tensors kept as they are, with file headers, "
                                  f"plus every linear at {min(cfg.bits)} bits); ask for at least {size_text(least, up=True)} "
                                  f"({least / self.dense_bytes:.2f}x of the dense {size_text(self.dense_bytes)})")

    def _keep_adjacent(self) -> None:
        """mix: adjacent (knapsack.adjacent_widths). An item that can take neither width (one its
        shape cannot pack) keeps its own options."""
        kept = knapsack.adjacent_widths({b: self._uniform_cost(Option(b, 0)) for b in self.config.bits}, self.room)
        if not kept:  # no width packs every linear: the allocation stays free
            return
        self.widths = kept
        for item in self.items:
            keep = [k for k, o in enumerate(item.options) if o.bits in kept]
            if keep:
                item.options, item.costs = [item.options[k] for k in keep], [item.costs[k] for k in keep]
        log.info("allocate: mixing %s-bit linears (mix: adjacent)", " and ".join(map(str, kept)))

    def _uniform_cost(self, option: Option) -> int | None:
        """Bytes of the targeted linears when every item takes `option`; None if one cannot."""
        if not all(option in it.options for it in self.items):
            return None
        return sum(it.costs[it.options.index(option)] for it in self.items)

    def _check_uniform(self, chosen: dict[str, int]) -> None:
        """Price the uniform allocations of the option set that fit (the shipped gptq recipes and
        their adapter variants), and fall back to the best one if it is estimated better."""
        room = self.room
        best_error = sum(it.errors[chosen[it.key]] for it in self.items)
        self.uniform = []
        for option in self.config.options():
            cost = self._uniform_cost(option)
            if cost is None:
                continue
            error = sum(it.errors[it.options.index(option)] for it in self.items)
            self.uniform.append({"option": option.label, "bytes": self.fixed_bytes + cost, "fits": cost <= room, "estimated_error": error})
            if cost <= room and error < best_error:
                best_error, self.fell_back = error, option.label
                for it in self.items:
                    chosen[it.key] = it.options.index(option)
        if self.fell_back:
            log.warning("allocate: the uniform %s allocation is estimated better than the solver's, so it is used", self.fell_back)

    def _describe(self) -> str:
        counts = Counter(o.label for o in self.allocation.values())
        return ", ".join(f"{label} x{n}" for label, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    # --- step 3: apply, layer by layer

    def apply(self, work) -> None:
        eigen = {}  # per input group: the Gram's eigen-decomposition, shared by the linears that read it
        for name in work.names:
            full = work.full(name)
            option = self.allocation.get(full)
            if option is None:
                continue
            module, H = work.module(name), work.gram(name)
            W = models.weight_of(module).detach().float()
            new, spec = Gptq(self._grid(option.bits)).quantize_module(module, H, None)
            dW = W.to(torch.float64) - effective_weight(new).to(W.device, torch.float64)
            weight = row_weights(self.weights[full]).to(W.device) if full in self.weights else None
            target = dW if weight is None else weight[:, None] * dW
            Hd = H.to(W.device, torch.float64)
            total = output_error(target, Hd)  # the weighted output error with no adapter
            self.realised[full] = total
            if option.rank:
                group = models.arch_for(work.run.model).linears[name]
                if group not in eigen:
                    eigen[group] = eora.gram_eigen(Hd)
                B, A, energies = eora.eora_fit(target, Hd, option.rank, eigen=eigen[group])
                self.realised[full] = errors_by_rank(energies, [option.rank], total)[0]
                if weight is not None:
                    B = (B.to(torch.float64) / weight[:, None]).to(B.dtype)
                new = LoraAdapted.from_factors(new, B.float(), A.float(), W.device, W.dtype)
            self.by_layer.setdefault(work.index, []).append(full)
            work.replace(name, new, spec)

    # --- report and export

    def _loss(self, errors: dict[str, float]) -> float | None:
        """Half the summed loss-weighted error: the second-order estimate of the rise in the mean
        next-token loss (nats); None for plain output errors, which are not in loss units."""
        return 0.5 * sum(errors.values()) if self.config.weighting == "loss" else None

    def report(self, model, specs: dict) -> dict:
        cfg = self.config
        quantised = {m: o for m, o in self.allocation.items()}
        adapted = peft.adapted(model)
        quant_specs = {m: s for m, s in specs.items() if s.type == "quant"}
        base_bits = gptq_v1.base_bits(**gptq_v1.mixed_bits(quant_specs)) if quant_specs else None
        entry = {
            "allocation": {
                "budget_bytes": self.budget_bytes,
                "budget": f"size {cfg.size}" if cfg.size is not None else f"{cfg.bits_per_weight} bits per decoder-linear weight",
                "dense_bytes": self.dense_bytes,
                "planned_bytes": self.planned_bytes,  # the tensors' bytes, exactly (headers come on top)
                "header_reserve": self.header_bytes,
                "linear_bits_per_weight": (self.planned_bytes - self.fixed_bytes) * 8 / self.dense_linear_weights if self.dense_linear_weights else None,
                "solver": "multiple-choice knapsack, exact dynamic programming (methods/allocate/knapsack.py)",
                "weighting": cfg.weighting,
                "mix": cfg.mix,
                "widths": self.widths,
                "tie_fused": cfg.tie_fused,
                "per_linear": {m: {"bits": o.bits, "rank": o.rank} for m, o in sorted(self.allocation.items())},
                "counts": dict(Counter(o.label for o in self.allocation.values())),
                "estimated_error": sum(self.estimated.values()),
                "sequential_error": sum(self.realised.values()) if self.realised else None,
                "estimated_loss_increase": self._loss(self.estimated),
                "sequential_loss_increase": self._loss(self.realised) if self.realised else None,
                "per_linear_error": {m: {"estimated": self.estimated[m], "sequential": self.realised.get(m)} for m in sorted(self.estimated)},
                "uniform": self.uniform,
                "fell_back_to_uniform": self.fell_back,
            },
            "quantization": {
                "method": self.name,
                "bits": base_bits,
                "bits_by_width": {str(b): sum(1 for o in quantised.values() if o.bits == b) for b in sorted({o.bits for o in quantised.values()})},
                "group_size": cfg.group_size,
                "sym": cfg.sym,
                "desc_act": cfg.act_order,
                "act_order": cfg.act_order,
                "damp": cfg.damp,
                "effective_bits": self._effective_bits(specs),
                "gptq_checkpoint": bool(specs) and all(gptq_v1.gptq_only(s) for s in specs.values()),
            },
        }
        ranks = {n: m.lora_A.out_features for n, m in adapted.items()}
        if ranks:
            entry["adapters"] = {
                "method": self.name, "merged": False, "ranks": ranks, "bits": None, "path": ADAPTER_DIR,
                "params": sum(m.lora_A.in_features * m.lora_A.out_features + m.lora_B.in_features * m.lora_B.out_features for m in adapted.values()),
            }
            entry["adapter_serving"] = {"vllm_max_lora_rank": vllm_max_lora_rank(ranks.values())}
        return entry

    def _effective_bits(self, specs: dict) -> float | None:
        """Stored bits per quantised weight (codes, scales, zeros, g_idx), adapters not counted."""
        sizes = [(s.out * s.inp, gptq_v1.effective_bits(s.bits, s.group_size, s.inp, s.out)) for m, s in specs.items() if s.type == "quant"]
        total = sum(n for n, _ in sizes)
        return sum(n * b for n, b in sizes) / total if total else None

    def summary_lines(self, model, specs: dict, entry: dict) -> list[str]:
        t = entry["allocation"]
        lines = [f"target {t['budget']}: {size_text(t['budget_bytes'])} of weights, planned {size_text(t['planned_bytes'])} "
                 f"({t['linear_bits_per_weight']:.2f} bits per decoder-linear weight with scales and adapters)"]
        counts = ", ".join(f"{label} x{n}" for label, n in sorted(t["counts"].items(), key=lambda kv: -kv[1]))
        lines.append(f"allocation over {len(t['per_linear'])} decoder linears: {counts}")
        if t["estimated_loss_increase"] is not None:
            seq = t["sequential_loss_increase"]
            lines.append(f"estimated loss increase {t['estimated_loss_increase']:.3g} nats (perplexity x{math.exp(t['estimated_loss_increase']):.3f})"
                         + (f"; on the compressed model's own inputs {seq:.3g}" if seq is not None else ""))
        fits = [u for u in t["uniform"] if u["fits"]]
        if t["fell_back_to_uniform"]:
            lines.append(f"fell back to the uniform {t['fell_back_to_uniform']} allocation, estimated better than the solver's")
        elif fits:
            best = min(fits, key=lambda u: u["estimated_error"])
            ratio = best["estimated_error"] / t["estimated_error"] if t["estimated_error"] else float("inf")
            lines.append(f"best uniform choice that fits: {best['option']}, estimated error x{ratio:.2f} of this allocation's")
        return lines

    def export(self, model, specs: dict) -> dict:
        """A GPTQ v1 quantization_config, per-module widths as GPTQModel `dynamic` rules when they differ
        (gptq/format.py; which loaders read them: docs/guides/mixed-bits.md)."""
        if not specs or not all(gptq_v1.gptq_only(s) for s in specs.values()):
            return {}
        c = self.config
        grid = {"bits": max(c.bits), "group_size": c.group_size, "sym": c.sym, "desc_act": c.act_order}  # bits: replaced by the base width
        skipped = [name for name, _, _ in models.iter_linears_any(model) if name not in specs]
        return {"quantization_config": gptq_v1.quantization_config(grid, c.damp, False, self.name, skipped, compressor.__version__,
                                                                   **gptq_v1.mixed_bits(specs))}

    # --- streaming: what a resumed run needs of finished layers

    def layer_state(self, index: int) -> dict | None:
        names = self.by_layer.get(index)
        return {"realised": [[m, self.realised[m]] for m in names]} if names else None

    def load_layer_state(self, index: int, state: dict, tensors: dict) -> None:
        self.realised.update(dict(state["realised"]))
        self.by_layer[index] = [m for m, _ in state["realised"]]

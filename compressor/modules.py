"""Compressed modules and the code that swaps them into a model.

This file is copied verbatim next to every exported checkpoint as `modeling_compressed.py`, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in plain transformers.
It must therefore import nothing but torch and transformers.

The compressed modules subclass nn.Linear (without its dense weight) because they keep its contract
(in_features -> out_features, x -> y), and because peft's LoRA wraps a layer only when it is an
nn.Linear: this is what lets a stock `PeftModel.from_pretrained` put EoRA adapters on them.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

BITS = (2, 3, 4, 8)  # the code widths GPTQ v1 packing holds (pack_chunk)


class LowRankLinear(nn.Linear):
    """y = up(down(x)): W (out x in) replaced by up.weight (out x r) @ down.weight (r x in).

    The factors may themselves be QuantLinear (quantised low-rank); the bias lives in `up`.
    """

    is_compressed = True
    _is_hf_initialized = True  # transformers: nothing of its own to initialise (children are)

    def __init__(self, in_features, out_features, rank, bias=False, device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no dense weight
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.register_parameter("bias", None)  # it lives in `up`
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    # Not the dense weight (there is none): peft places and casts a LoRA by the device and dtype of
    # `weight` (or `qweight`), so it names the first factor's storage.
    @property
    def weight(self):
        return self.down.weight if self.down.weight is not None else self.down.qweight

    def forward(self, x):
        return self.up(self.down(x))

    # The compressed-linear interface (LowRankLinear, QuantLinear, LoraAdapted; plain nn.Linear
    # through the module functions below): what export, accounting and adapter fits ask of a layer.
    def effective_weight(self):
        """The (out, in) float32 matrix this layer applies."""
        return effective_weight(self.up) @ effective_weight(self.down)

    def stored_bits(self):
        """Bits this layer occupies in a checkpoint (its factors, quantised or not)."""
        own = sum(_bits(t) for t in [*self.parameters(recurse=False), *self.buffers(recurse=False)])
        return stored_bits(self.up) + stored_bits(self.down) + own

    def stored_values(self):
        """Values it stores, a quantised factor counted as its logical size."""
        return stored_values(self.up) + stored_values(self.down) + sum(p.numel() for p in self.parameters(recurse=False))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankSparseLinear(LowRankLinear):
    """Low-rank part plus a residual kept on a few whole input columns (LOST-style).

    The residual is stored compactly: `sparse_values` (out x c) and the sorted column indices
    `sparse_cols` (c); y = up(down(x)) + x[..., cols] @ sparse_values^T.
    """

    def __init__(self, in_features, out_features, rank, cols, bias=False, device=None, dtype=None):
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        self.sparse_values = nn.Parameter(torch.zeros(out_features, cols, device=device, dtype=dtype))
        self.register_buffer("sparse_cols", torch.zeros(cols, dtype=torch.long, device=device))

    def forward(self, x):
        sparse = nn.functional.linear(x.index_select(-1, self.sparse_cols), self.sparse_values)
        return self.up(self.down(x)) + sparse

    def effective_weight(self):
        W = super().effective_weight()
        W[:, self.sparse_cols] += self.sparse_values.detach().float()
        return W


# ----------------------------------------------------------------------------- GPTQ v1 runtime
# The packing maths and its layout notes live in compressor/methods/gptq/format.py; what a loader needs
# to read a checkpoint back is here, so exported checkpoints carry it.

def pack_chunk(bits):
    """(codes, words): the smallest whole number of int32 words that codes of `bits` fill exactly."""
    codes = 32 // math.gcd(32, bits)
    return codes, codes * bits // 32


def unpack_rows(words, bits):
    """(n*bits/32, m) int32 words -> (n, m) int32 codes, code i at stream bits [bits*i, bits*(i+1))."""
    per, n_words = pack_chunk(bits)
    m = words.shape[1]
    u = (words.to(torch.int64) & 0xFFFFFFFF).reshape(-1, n_words, m)
    vals = torch.empty(u.shape[0], per, m, dtype=torch.int64, device=words.device)
    for k in range(per):
        w, s = divmod(bits * k, 32)
        v = u[:, w] >> s
        if s + bits > 32:  # the code straddles two words (3 bits)
            v = v | (u[:, w + 1] << (32 - s))
        vals[:, k] = v & (2**bits - 1)
    return vals.reshape(-1, m).to(torch.int32)


def dequantize(q, zeros, scales, g_idx):
    """W (out, in) float32 = scales[g] * (q - zeros[g]) with g = g_idx[column]."""
    g = g_idx.long()
    return scales.float().T[:, g] * (q - zeros.T[:, g]).float()


class QuantLinear(nn.Linear):
    """A linear layer stored as GPTQ v1 buffers; dequantises once per device/dtype and caches.

    Buffer names, shapes and dtypes are those of GPTQ checkpoints (qweight, qzeros, scales fp16,
    g_idx, bias), so its state dict is what a GPTQ loader expects for this layer.
    """

    is_compressed = True
    _is_hf_initialized = True  # transformers: every buffer comes from the checkpoint

    def __init__(self, in_features, out_features, bits, group_size=128, bias=False, dtype=torch.float16, device=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no float weight
        per, _ = pack_chunk(bits)
        if bits not in BITS or in_features % per or out_features % per:
            raise ValueError(f"{bits}-bit GPTQ packing needs 2/3/4/8 bits and in/out features divisible by {per}, got {in_features} x {out_features}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.register_parameter("weight", None)  # see LowRankLinear
        n_groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
        kw = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, **kw))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, **kw))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        g = in_features if group_size == -1 else group_size
        self.register_buffer("g_idx", (torch.arange(in_features, device=device) // g).int())
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._cache = None

    def dequantized_weight(self):
        q = unpack_rows(self.qweight, self.bits).T
        zeros = unpack_rows(self.qzeros.T, self.bits).T + 1  # v1 stores zero - 1
        # A plain tensor even when first called under inference_mode, so the cache can later be
        # saved for backward (e.g. training adapters on top of this layer).
        with torch.inference_mode(False), torch.no_grad():
            return dequantize(q, zeros, self.scales, self.g_idx)

    def tensors_changed(self) -> None:
        """Its buffers were overwritten in place (a distributed run broadcast rank 0's layer): the
        cached dequantised weight is stale."""
        self._cache = None

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        super()._apply(fn, *args, **kwargs)
        # Scales are fp16 in the format: a model-wide .float() / .to(dtype) must not change that.
        if self.scales.dtype != torch.float16:
            self.scales = self.scales.half()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def effective_weight(self):
        return self.dequantized_weight()

    def stored_bits(self):
        return sum(_bits(t) for t in self.buffers())

    def stored_values(self):
        return self.in_features * self.out_features + (0 if self.bias is None else self.bias.numel())

    def forward(self, x):
        w = self._cache
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self._cache = self.dequantized_weight().to(device=x.device, dtype=x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None = None, device=None, dtype=None) -> nn.Linear:
    """A fresh nn.Linear holding copies of `weight` (out, in) and `bias`, on weight's device and in
    its dtype unless given."""
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=bias is not None, device=device or weight.device, dtype=dtype or weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


class LoraAdapted(nn.Module):
    """base(x) + B(A(x)): a compressed layer with its compensation adapter (EoRA).

    Float adapters live in memory only: exports write `base` into the checkpoint and A, B into a
    PEFT LoRA folder (scale 1), which peft applies with exactly this arithmetic. Quantised adapters
    (A, B QuantLinear) have no PEFT form and stay in the checkpoint, under base. / lora_A. / lora_B.
    """

    def __init__(self, base, lora_A, lora_B):
        super().__init__()
        self.base, self.lora_A, self.lora_B = base, lora_A, lora_B

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @classmethod
    def from_factors(cls, base, B, A, device=None, dtype=None):
        """base(x) + B (A x) with A (r x in), B (out x r) copied into fresh linears."""
        return cls(base, linear_from(A, device=device, dtype=dtype), linear_from(B, device=device, dtype=dtype))

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))

    def effective_weight(self):
        return effective_weight(self.base) + effective_weight(self.lora_B) @ effective_weight(self.lora_A)

    def stored_bits(self):
        """The base's bits, plus quantised adapters' (kept in the checkpoint); float adapters go to
        the PEFT folder and are not counted."""
        kept = isinstance(self.lora_A, QuantLinear)
        return stored_bits(self.base) + (stored_bits(self.lora_A) + stored_bits(self.lora_B) if kept else 0)

    def stored_values(self):
        return stored_values(self.base)  # adapters are counted apart (report["adapters"])


def _bits(t) -> int:
    return t.numel() * t.element_size() * 8


def effective_weight(module) -> torch.Tensor:
    """The (out, in) float32 matrix any decoder linear applies (compressed or plain)."""
    if hasattr(module, "effective_weight"):
        return module.effective_weight()
    weight = module.weight.detach()
    return (weight.T if type(module).__name__ == "Conv1D" else weight).float()  # GPT-2's Conv1D stores (in, out)


def stored_bits(module) -> int:
    if hasattr(module, "stored_bits"):
        return module.stored_bits()
    return sum(_bits(t) for t in [*module.parameters(), *module.buffers()])


def stored_values(module) -> int:
    if hasattr(module, "stored_values"):
        return module.stored_values()
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- module specs

SPEC_TYPES = ("dense", "quant", "lowrank", "lowrank_sparse")
MAX_SIZE = 2**20


@dataclass(frozen=True)
class ModuleSpec:
    """What one decoder linear became, as config.compression["modules"] records it (to_json) and
    a loader rebuilds it (from_json, then build_module). Every consumer (export, accounting,
    adapters, this loader) reads these fields rather than re-deriving them from module types.

    type: "dense" (a plain linear of another shape, e.g. per-layer MLP widths), "quant" (GPTQ v1
    buffers), "lowrank" (up @ down), "lowrank_sparse" (low-rank plus `cols` whole input columns).
    quant: {"bits", "group_size"} when both factors of a low-rank module are quantised.
    adapter: {"rank", "bits", "group_size"} for a quantised adapter kept in the checkpoint."""

    type: str
    out: int
    inp: int
    bias: bool
    rank: int | None = None
    cols: int | None = None
    bits: int | None = None
    group_size: int | None = None
    quant: dict | None = None
    adapter: dict | None = None

    @property
    def factorised(self) -> bool:
        return self.type in ("lowrank", "lowrank_sparse")

    def replace(self, **changes) -> "ModuleSpec":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        found = {"type": self.type, "out": self.out, "in": self.inp, "bias": self.bias}
        for key in ("rank", "cols", "bits", "group_size", "quant", "adapter"):
            if getattr(self, key) is not None:
                found[key] = dict(getattr(self, key)) if isinstance(getattr(self, key), dict) else getattr(self, key)
        return found

    @classmethod
    def from_json(cls, name: str, data) -> "ModuleSpec":
        """A spec read from a config, every field checked (ValueError naming the module and the
        field): an edited or damaged config must not build a model of the wrong shape."""
        def bad(why):
            return ValueError(f"compression.modules[{name!r}]: {why}")

        if not isinstance(data, dict):
            raise bad(f"must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"type", "out", "in", "bias", "rank", "cols", "bits", "group_size", "quant", "adapter"}
        if unknown:
            raise bad(f"unknown field {sorted(unknown)[0]!r}")
        kind = data.get("type")
        if kind not in SPEC_TYPES:
            raise bad(f"type must be one of {', '.join(SPEC_TYPES)}, got {kind!r}")

        def count(key, low=1):
            v = data.get(key)
            # 2**20 bounds every size (no model's width comes near): a tampered 10**9 allocates nothing.
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= MAX_SIZE:
                raise bad(f"{key} must be an integer in [{low}, {MAX_SIZE}], got {str(v)[:40]}")
            return v

        def grid(key, value, need_rank=False):
            if not isinstance(value, dict):
                raise bad(f"{key} must be a mapping, got {type(value).__name__}")
            if value.get("bits") not in BITS or isinstance(value.get("bits"), bool):
                raise bad(f"{key}.bits must be one of {BITS}, got {value.get('bits')!r}")
            g = value.get("group_size")
            if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or 1 <= g <= MAX_SIZE):
                raise bad(f"{key}.group_size must be -1 or a positive integer, got {g!r}")
            r = value.get("rank")
            if need_rank and (isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_SIZE):
                raise bad(f"{key}.rank must be an integer in [1, {MAX_SIZE}], got {str(r)[:40]}")
            return dict(value)

        if not isinstance(data.get("bias"), bool):
            raise bad(f"bias must be true or false, got {data.get('bias')!r}")
        extra = set(data) - {"type", "out", "in", "bias", "adapter"} - _FIELDS[kind]
        if extra:
            raise bad(f"a {kind} module has no {sorted(extra)[0]!r}")
        factorised = kind in ("lowrank", "lowrank_sparse")
        bits = group = None
        if kind == "quant":
            q = grid("quant", {"bits": data.get("bits"), "group_size": data.get("group_size")})
            bits, group = q["bits"], q["group_size"]
        return cls(kind, count("out"), count("in"), data["bias"],
                   rank=count("rank") if factorised else None,
                   cols=count("cols", 0) if kind == "lowrank_sparse" else None,
                   bits=bits, group_size=group,
                   quant=grid("quant", data["quant"]) if data.get("quant") is not None else None,
                   adapter=grid("adapter", data["adapter"], need_rank=True) if data.get("adapter") is not None else None)


_FIELDS = {"dense": set(), "quant": {"bits", "group_size"}, "lowrank": {"rank", "quant"}, "lowrank_sparse": {"rank", "cols", "quant"}}


def specs_from_json(found) -> dict:
    """config.compression["modules"] as ModuleSpecs (ValueError on anything malformed)."""
    if not isinstance(found, dict):
        raise ValueError(f"compression.modules must be a mapping of module names to specs, got {type(found).__name__}")
    return {name: found[name] if isinstance(found[name], ModuleSpec) else ModuleSpec.from_json(name, found[name]) for name in found}


def specs_to_json(specs: dict) -> dict:
    return {name: spec.to_json() for name, spec in sorted(specs.items())}


# ----------------------------------------------------------------------------- building a model

def _quant_factor(in_features, out_features, quant, bias, like):
    return QuantLinear(in_features, out_features, quant["bits"], quant["group_size"], bias=bias, dtype=like.dtype, device=like.device)


def _build_base(spec, weight):
    kwargs = dict(bias=spec.bias, device=weight.device, dtype=weight.dtype)
    if spec.type == "dense":  # a plain linear of another shape (structured per-layer widths)
        return nn.Linear(spec.inp, spec.out, **kwargs)
    if spec.type == "quant":
        return QuantLinear(spec.inp, spec.out, spec.bits, spec.group_size, **kwargs)
    if spec.type == "lowrank":
        module = LowRankLinear(spec.inp, spec.out, spec.rank, **kwargs)
    else:
        module = LowRankSparseLinear(spec.inp, spec.out, spec.rank, spec.cols, **kwargs)
    if spec.quant:
        module.down = _quant_factor(spec.inp, spec.rank, spec.quant, False, weight)
        module.up = _quant_factor(spec.rank, spec.out, spec.quant, spec.bias, weight)
    return module


def build_module(spec, like):
    """A compressed module for `spec` (a ModuleSpec, or its JSON from config.compression["modules"]),
    placed like `like`; with a quantised adapter in the checkpoint when the spec has one."""
    if not isinstance(spec, ModuleSpec):
        spec = ModuleSpec.from_json("?", spec)
    weight = like.weight if getattr(like, "weight", None) is not None else next(like.parameters())
    module = _build_base(spec, weight)
    adapter = spec.adapter
    if adapter is None:
        return module
    lora_A = _quant_factor(spec.inp, adapter["rank"], adapter, False, weight)
    lora_B = _quant_factor(adapter["rank"], spec.out, adapter, False, weight)
    return LoraAdapted(module, lora_A, lora_B)


def swap_modules(model, module_specs):
    """Replace each named linear by the compressed module its spec describes."""
    for name, spec in specs_from_json(module_specs).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, build_module(spec, getattr(parent, child)))
    return model


def compressed_class(base):
    """A subclass of a transformers model class that builds the compressed structure in __init__."""

    class Compressed(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            swap_modules(self, config.compression["modules"])

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            # A GPTQ export's config carries `quantization_config` for GPTQ loaders (gptqmodel,
            # vLLM); this class reads those tensors itself, so transformers' quantizer (which
            # would demand gptqmodel) must not be engaged.
            if kwargs.get("config") is None and args:
                kwargs["config"] = cls.config_class.from_pretrained(args[0])
            config = kwargs["config"]
            if getattr(config, "quantization_config", None) is not None:
                del config.quantization_config
            return super().from_pretrained(*args, **kwargs)

    Compressed.__name__ = Compressed.__qualname__ = "Compressed" + base.__name__
    return Compressed

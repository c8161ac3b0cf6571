"""Architecture adapters: where a model keeps its decoder layers and which linears they hold.

Everything else in the toolkit is architecture-agnostic; adding a model family means adding one
`Arch` entry here. Each linear is tagged with the name of its *input*: linears that read the same
activation (q/k/v, gate/up) share one Gram matrix in calibration.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from compressor.errors import CompressorError

_LLAMA_LIKE = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "mlp_out",
}
_GPT_LIKE = {
    "attn.c_attn": "attn_in",
    "attn.c_proj": "attn_out",
    "mlp.c_fc": "mlp_in",
    "mlp.c_proj": "mlp_out",
}


@dataclass(frozen=True)
class Mlp:
    """The MLP's intermediate width: the linears that produce it (gate and up, or c_fc), the one
    that reads it, and the config key that sets it."""

    inputs: tuple[str, ...]
    output: str
    config_key: str


_LLAMA_MLP = Mlp(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size")
_GPT_MLP = Mlp(("mlp.c_fc",), "mlp.c_proj", "n_inner")


@dataclass(frozen=True)
class Arch:
    layers: str  # dotted path from the CausalLM to its ModuleList of decoder layers
    linears: dict[str, str]  # linear name inside a layer -> input group
    mlp: Mlp | None = None


ARCHS: dict[str, Arch] = {
    "llama": Arch("model.layers", _LLAMA_LIKE, _LLAMA_MLP),
    "mistral": Arch("model.layers", _LLAMA_LIKE, _LLAMA_MLP),
    "qwen2": Arch("model.layers", _LLAMA_LIKE, _LLAMA_MLP),
    "qwen3": Arch("model.layers", _LLAMA_LIKE, _LLAMA_MLP),
    "gemma3_text": Arch("model.layers", _LLAMA_LIKE, _LLAMA_MLP),
    "starcoder2": Arch(
        "model.layers",
        {
            "self_attn.q_proj": "attn_in",
            "self_attn.k_proj": "attn_in",
            "self_attn.v_proj": "attn_in",
            "self_attn.o_proj": "attn_out",
            "mlp.c_fc": "mlp_in",
            "mlp.c_proj": "mlp_out",
        },
        Mlp(("mlp.c_fc",), "mlp.c_proj", "intermediate_size"),
    ),
    # StarCoder 1: c_attn fuses q with the single shared k/v head (multi-query attention).
    "gpt_bigcode": Arch("transformer.h", _GPT_LIKE, _GPT_MLP),
    # GPT-2 stores its linears as Conv1D, weight laid out (in, out).
    "gpt2": Arch("transformer.h", _GPT_LIKE, _GPT_MLP),
}


def arch_for(model: nn.Module) -> Arch:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHS:
        raise CompressorError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHS))} "
            "(add an Arch entry in compressor/models.py to support another)"
        )
    return ARCHS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_for(model).layers)


def layer_prefix(model: nn.Module, index: int) -> str:
    return f"{arch_for(model).layers}.{index}"


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def weight_of(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or a transformers Conv1D, without copying."""
    return module.weight.t() if is_conv1d(module) else module.weight


def new_linear_like(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """A fresh layer of `module`'s kind (nn.Linear or Conv1D) holding `weight` (out, in) and `bias`."""
    out_f, in_f = weight.shape
    like = module.weight
    if is_conv1d(module):
        new = type(module)(out_f, in_f).to(device=like.device, dtype=like.dtype)
        with torch.no_grad():
            new.weight.copy_(weight.t())
            if bias is None:
                new.bias = None
            else:
                new.bias.copy_(bias)
        return new
    new = nn.Linear(in_f, out_f, bias=bias is not None, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def replace_linear(layer: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the linear `name` (e.g. "mlp.down_proj") sits inside `layer`."""
    parent, _, child = name.rpartition(".")
    setattr(layer.get_submodule(parent), child, module)


def layer_linears(model: nn.Module, layer: nn.Module, names: Collection[str] | None = None) -> dict[str, nn.Module]:
    """Linear name -> module for one decoder layer, in the adapter's order; `names`: only those
    (the others may be compressed already)."""
    found = {}
    for name in arch_for(model).linears:
        if names is not None and name not in names:
            continue
        module = layer.get_submodule(name)
        # Compressed modules subclass nn.Linear (for peft) but carry no dense weight.
        if getattr(module, "is_compressed", False) or not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise CompressorError(
                f"'{name}' in {type(layer).__name__} is a {type(module).__name__}, not a dense linear; "
                "was this model already compressed? Start from the original checkpoint"
            )
        found[name] = module
    return found


def iter_linears(model: nn.Module):
    """(full name, name inside its layer, module) for every linear the toolkit may compress."""
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer_linears(model, layer).items():
            yield f"{layer_prefix(model, i)}.{name}", name, module


def iter_linears_any(model: nn.Module):
    """Like iter_linears, but compressed modules (low-rank, quantised, adapted) are yielded too."""
    for i, layer in enumerate(decoder_layers(model)):
        for name in arch_for(model).linears:
            yield f"{layer_prefix(model, i)}.{name}", name, layer.get_submodule(name)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of any decoder linear, compressed or not."""
    if is_conv1d(module):
        return tuple(module.weight.shape[::-1])
    return module.out_features, module.in_features


def count_params(model: nn.Module) -> int:
    """Parameters counted once even when tied (embedding and lm_head often are)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def guard_token_ids(model) -> None:
    """Refuse, with a message, a token id beyond the model's embedding (a tokenizer of another
    model): without this, the embedding lookup fails with an IndexError deep in the forward pass.
    A forward pre-hook, so every path that feeds the model (calibration, perplexity, generation)
    is covered at the cost of one max() per call."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None or getattr(embedding, "_compressor_guard", False):
        return

    def check(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input")
        if ids is not None and ids.numel() and not ids.is_meta and int(ids.max()) >= module.num_embeddings:
            raise CompressorError(f"token id {int(ids.max())} is beyond the model's {module.num_embeddings} embeddings: the tokenizer "
                                  "does not belong to this model; save the model's own tokenizer beside it")

    embedding.register_forward_pre_hook(check, with_kwargs=True)
    embedding._compressor_guard = True

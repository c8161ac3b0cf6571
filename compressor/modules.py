"""Compressed modules and the code that swaps them into a model.

This file is copied verbatim next to every exported checkpoint as `modeling_compressed.py`, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in plain transformers.
It must therefore import nothing but torch and transformers.
"""

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """y = up(down(x)): W (out x in) replaced by up.weight (out x r) @ down.weight (r x in)."""

    def __init__(self, in_features, out_features, rank, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.up(self.down(x))

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


def build_module(spec, like):
    """A compressed module for `spec` (from config.compression["modules"]), placed like `like`."""
    weight = like.weight if hasattr(like, "weight") else next(like.parameters())
    kwargs = dict(bias=spec["bias"], device=weight.device, dtype=weight.dtype)
    if spec["type"] == "lowrank":
        return LowRankLinear(spec["in"], spec["out"], spec["rank"], **kwargs)
    if spec["type"] == "lowrank_sparse":
        return LowRankSparseLinear(spec["in"], spec["out"], spec["rank"], spec["cols"], **kwargs)
    raise ValueError(f"unknown compressed module type {spec['type']!r}")


def swap_modules(model, module_specs):
    """Replace each named linear by the compressed module its spec describes."""
    for name, spec in module_specs.items():
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

    Compressed.__name__ = Compressed.__qualname__ = "Compressed" + base.__name__
    return Compressed

"""Gram matrices H = X^T X / N of linear-layer inputs (and cross-Grams against the dense model's), collected by forward hooks."""

from __future__ import annotations

import torch
from torch import nn

from compressor.errors import CompressorError


class GramCollector:
    """Forward hooks that accumulate H = X^T X / N for each distinct linear input of one layer.

    Linears that read the same activation (q/k/v) share a group, so each Gram is computed once.
    Accumulation is in float64 by default: sums over 10^5+ tokens lose digits in float32 and the
    whitening that follows inverts H, which magnifies any error.
    """

    def __init__(self, linears: dict[str, nn.Module], groups: dict[str, str], dtype: torch.dtype = torch.float64):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.dtype = dtype
        self._handles = [module.register_forward_hook(self._hook(group)) for group, module in one_per_group(linears, groups).items()]

    def _hook(self, group: str):
        def hook(module, args, output):
            self._add(group, args[0].detach().reshape(-1, args[0].shape[-1]).to(self.dtype))

        return hook

    def _add(self, group: str, x: torch.Tensor) -> None:
        if group in self.sums:
            self.sums[group].addmm_(x.T, x)
        else:
            self.sums[group] = x.T @ x
        self.counts[group] = self.counts.get(group, 0) + x.shape[0]

    def grams(self) -> dict[str, torch.Tensor]:
        return {g: s / self.counts[g] for g, s in self.sums.items()}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def one_per_group(linears: dict[str, nn.Module], groups: dict[str, str]) -> dict[str, nn.Module]:
    """Per input group, the first of `linears` that reads it (hooking one is enough)."""
    first: dict[str, nn.Module] = {}
    for name, module in linears.items():
        first.setdefault(groups[name], module)
    return first


class DriftCollector(GramCollector):
    """GramCollector that also accumulates K = X_d^T X / N, the dense model's inputs against the
    compressed model's, token by token, for the eora stage's `propagation`.

    Each batch runs through the layer twice: first the dense layer on the dense model's hidden
    states with `recording` set, which keeps every group's input, then the layer on the compressed
    model's, which adds H and pairs with what was kept. So K needs no more memory than one batch's
    inputs. dense_linears: the dense layer's linears, when it is a separate copy (true_sequential
    compresses the layer between passes); by default the dense pass runs through `linears` too.
    """

    def __init__(self, linears: dict[str, nn.Module], groups: dict[str, str], dtype: torch.dtype = torch.float64,
                 dense_linears: dict[str, nn.Module] | None = None):
        super().__init__(linears, groups, dtype)
        self.recording = False
        self.kept: dict[str, torch.Tensor] = {}
        self.cross_sums: dict[str, torch.Tensor] = {}
        dense_linears = linears if dense_linears is None else {n: m for n, m in dense_linears.items() if n in linears}
        self._handles += [module.register_forward_hook(self._keep(group)) for group, module in one_per_group(dense_linears, groups).items()]

    def _keep(self, group: str):
        def hook(module, args, output):
            if self.recording:
                self.kept[group] = args[0].detach().reshape(-1, args[0].shape[-1])

        return hook

    def _hook(self, group: str):
        def hook(module, args, output):
            if self.recording:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            dense = self.kept.pop(group, None)
            if dense is None or dense.shape != x.shape:
                raise CompressorError("propagation: the dense and compressed passes of a layer saw different inputs; run the dense pass first")
            x = x.to(self.dtype)
            self._add(group, x)
            pair = dense.to(self.dtype).T @ x
            self.cross_sums[group] = pair if group not in self.cross_sums else self.cross_sums[group] + pair

        return hook

    def crosses(self) -> dict[str, torch.Tensor]:
        return {g: s / self.counts[g] for g, s in self.cross_sums.items()}

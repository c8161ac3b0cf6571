"""Gram matrices H = X^T X / N of linear-layer inputs (and cross-Grams against the dense model's), collected by forward hooks."""

from __future__ import annotations

import torch
from torch import nn

from compressor.errors import CompressorError

# Tokens per float32 product in the chunked Gram: the error of a float32 sum grows with its length,
# so each chunk is short enough to stay near float32's precision and the chunks add up in float64
# (tests/calibration/test_collect.py measures both against the float64 reference).
CHUNK_TOKENS = 512
# Whether collectors use chunked_gram when not told: None = on CUDA only. Benchmarks set True to
# run that path on a CPU (benchmarks/gpu_check.py --quick), where it is otherwise only tested.
CHUNKED: bool | None = None
# Low 13 of float32's 23 mantissa bits: clearing them leaves a TF32 value (10 mantissa bits).
_TF32_DROP = 0x1FFF
_TF32_HALF = 0x1000


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x (float32, finite) rounded to the nearest TF32 value (ties away from zero): what a tensor
    core reads of it, made explicit, so that the split below loses nothing there on any device.
    Adding half a unit to the magnitude bits carries into the exponent where it must."""
    return ((x.view(torch.int32) + _TF32_HALF) & ~_TF32_DROP).view(torch.float32)


def chunked_gram(x: torch.Tensor, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """X^T X in float64 from float32 products of `chunk` tokens at a time, each on TF32 tensor
    cores where the device has them, without TF32's rounding.

    Each chunk is split as X = hi + lo with hi its TF32 rounding and lo the rest (exact in
    float32, then rounded to TF32 too, an error of 2^-22 of X). X^T X = hi^T hi + hi^T lo +
    lo^T hi + lo^T lo; the last term is below float32's precision and dropped. Products of TF32
    values are exact in float32, so the two GEMMs (hi^T hi, hi^T lo) are as accurate as a float32
    GEMM while running at the tensor-core rate (~7x the FP64 rate on an H100/H200). The float64
    sum of the chunks keeps the error from growing with the token count.
    """
    d = x.shape[-1]
    total = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    with _tf32(x.device):
        for part in x.split(chunk):
            part = part.float().contiguous()
            hi = to_tf32(part)
            lo = to_tf32(part - hi)
            cross = hi.T @ lo
            total += (hi.T @ hi + (cross + cross.T)).double()
    return total


class _tf32:
    """Let float32 matmuls use TF32 tensor cores on CUDA for the duration (their inputs are TF32
    values already, so nothing is rounded); restores the global setting."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = self.before


class GramCollector:
    """Forward hooks that accumulate H = X^T X / N for each distinct linear input of one layer.

    Linears that read the same activation (q/k/v) share a group, so each Gram is computed once.
    Sums are float64 by default: sums over 10^5+ tokens lose digits in float32 and the whitening
    that follows inverts H, which magnifies any error. `chunked` (default: on CUDA, for float64
    sums) forms them with chunked_gram, float32 tensor-core products added in float64, instead of
    float64 GEMMs, which run on a GPU's FP64 units at a fraction of its tensor-core rate. The CPU
    keeps float64 GEMMs (no tensor cores; a float32 GEMM there is only ~2x faster).
    """

    def __init__(self, linears: dict[str, nn.Module], groups: dict[str, str], dtype: torch.dtype = torch.float64, chunked: bool | None = None):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.dtype = dtype
        self.chunked = chunked
        self._handles = [module.register_forward_hook(self._hook(group)) for group, module in one_per_group(linears, groups).items()]

    def _hook(self, group: str):
        def hook(module, args, output):
            self._add(group, args[0].detach().reshape(-1, args[0].shape[-1]))

        return hook

    def _uses_chunks(self, x: torch.Tensor) -> bool:
        chunked = self.chunked if self.chunked is not None else CHUNKED
        if chunked is not None:
            return chunked and self.dtype == torch.float64
        return x.is_cuda and self.dtype == torch.float64

    def _add(self, group: str, x: torch.Tensor) -> None:
        if self._uses_chunks(x):
            product = chunked_gram(x)
            if group in self.sums:
                self.sums[group] += product
            else:
                self.sums[group] = product
        else:
            x = x.to(self.dtype)
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
                 dense_linears: dict[str, nn.Module] | None = None, chunked: bool | None = None):
        super().__init__(linears, groups, dtype, chunked)
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
            self._add(group, x)
            x = x.to(self.dtype)
            pair = dense.to(self.dtype).T @ x
            self.cross_sums[group] = pair if group not in self.cross_sums else self.cross_sums[group] + pair

        return hook

    def crosses(self) -> dict[str, torch.Tensor]:
        return {g: s / self.counts[g] for g, s in self.cross_sums.items()}

"""How much the calibration loss cares about each output channel of each linear.

For a small change dy of a linear's output, a second-order expansion of the next-token loss with
the Fisher (gradient outer-product) approximation gives dL ~ 1/2 sum_t (g_t . dy_t)^2, g_t the loss
gradient at that output for token t. Keeping only its diagonal and averaging the gradients over
tokens gives dL ~ N/2 sum_i D_i ||dy_i||^2 / N with D_i = mean_t g_{t,i}^2: an output error in
channel i costs D_i per unit of squared error. These are the row weights of Fisher-weighted SVD
(FWSVD, Hsu et al., arXiv 2207.00112); the eora stage's `weighting: loss` uses them so that
adapters remove the error the loss notices, and so that error energies of different modules (q_proj
of layer 0, down_proj of layer 17) are comparable in one pool.

Keeping the whole matrix instead, G = mean_t g_t g_t^T (out x out), gives dL ~ N/2 tr(G dY^T dY / N)
summed over channel pairs: errors that push several channels along a direction the loss is steep in
cost more than their per-channel sizes say. With the input Gram H this is the Kronecker-factored
Fisher (K-FAC, Martens and Grosse, arXiv 1503.05671) of the layer; the eora stage's
`weighting: loss-full` fits adapters under it (output_roots gives G^1/2 and its inverse).

One forward and backward pass per calibration window through the dense model, with no weight
gradients (only activation gradients are kept), so memory is the model plus one window's
activations, plus one out x out float64 matrix per linear with `full`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from compressor import models, progress
from compressor.errors import CompressorError


def output_sensitivity(model: nn.Module, windows: torch.Tensor, device: torch.device, names: set[str] | None = None,
                       full: bool = False, *, executor) -> dict[str, torch.Tensor]:
    """Full linear name -> D (out_features,), float64 on CPU: the mean over calibration tokens of
    the squared gradient of the summed next-token cross-entropy with respect to that output; with
    `full`, G (out_features, out_features), the mean of the gradients' outer products (D is its
    diagonal).

    names: the linears to measure (default: every decoder linear).
    executor: the run's (Run.executor): with several ranks, each runs its share of the windows and
    the sums and token counts are added over the ranks."""
    targets = {name: module for name, _, module in models.iter_linears(model) if names is None or name in names}
    if not targets:
        raise CompressorError("loss weighting found no decoder linears to measure")
    if full:
        _check_room(sum(models.weight_of(m).shape[0] ** 2 * 8 for m in targets.values()))
    sums: dict[str, torch.Tensor] = {}

    def watch(name):
        def on_forward(module, args, out):
            def on_grad(g):
                g = g.detach().reshape(-1, g.shape[-1])
                if full:
                    # one window's products in at least float32 (a matmul), summed over windows in float64
                    g = g.to(torch.promote_types(g.dtype, torch.float32))
                    sq = (g.T @ g).to(torch.float64)
                else:
                    sq = g.to(torch.float64).square().sum(0)
                sums[name] = sq if name not in sums else sums[name] + sq
            out.register_hook(on_grad)
        return on_forward

    frozen = {p: p.requires_grad for p in model.parameters()}
    embed = model.get_input_embeddings()
    hooks = [m.register_forward_hook(watch(n)) for n, m in targets.items()]
    # Weights stay frozen; gradients start at the embedding output instead, so no weight gradient
    # is ever allocated.
    hooks.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    home = next(model.parameters()).device
    tokens = 0
    windows = executor.shard(windows)
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.to(device)
        for window in progress.iterate(windows.split(1), "loss sensitivity", "windows"):
            ids = window.to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            # half-precision logits are upcast for the softmax; float64 ones stay float64
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            loss.backward()
            tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.to(home)
    sums, tokens = executor.sum_tensors(sums, "loss sensitivities"), executor.sum_counts({"tokens": tokens})["tokens"]
    missing = sorted(set(targets) - set(sums))
    if missing:
        raise CompressorError(f"loss weighting: no gradient reached {missing[0]} (and {len(missing) - 1} more); the loss does not depend on it")
    return {name: (s / tokens).cpu() for name, s in sums.items()}


def host_memory() -> int:
    """This machine's physical memory in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def _check_room(need: int) -> None:
    # Grows as out^2 per linear: 1.4 GiB for Gemma 3 270M, 78 GiB for a 7B Llama (the diagonal: 11 MB).
    total = host_memory()
    if total and need > total // 2:
        raise CompressorError(f"weighting: loss-full keeps an out x out float64 matrix per adapted linear, {need / 2**30:.1f} GiB here, "
                              f"more than half of this machine's {total / 2**30:.0f} GiB; use weighting: loss, or fewer eora targets")


def _floored(values: torch.Tensor, floor: float) -> torch.Tensor:
    """values raised to at least floor * their (non-negative) mean, so roots of them are safe to
    divide by."""
    return values.clamp_min(floor * values.clamp_min(0).mean().clamp_min(torch.finfo(torch.float64).tiny))


def row_weights(D: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """sqrt(D) with channels the loss ignores raised to floor * mean(D), so dividing by it is safe."""
    return _floored(D.to(torch.float64), floor).sqrt()


def output_roots(G: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(G^1/2, G^-1/2), float64, of a symmetric PSD output Gram, with eigenvalues raised to
    floor * their mean first, so the inverse is safe (the full-matrix row_weights)."""
    G = G.to(torch.float64)
    lam, P = torch.linalg.eigh((G + G.T) / 2)
    lam = _floored(lam, floor)
    return (P * lam.sqrt()) @ P.T, (P * lam.rsqrt()) @ P.T

"""Synthetic layer inputs shared by the quantisation and adapter tests."""

import math

import torch


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Activations X = Z M: correlated channels with unequal scales, like a real layer's inputs."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / math.sqrt(d)
    scale = torch.exp(torch.randn(d, generator=gen) * 0.5)
    return torch.randn(n, d, generator=gen) @ mix * scale


def gram(X: torch.Tensor) -> torch.Tensor:
    X = X.double()
    return X.T @ X / X.shape[0]

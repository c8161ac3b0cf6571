import torch


def correlated_inputs(n_in: int, tokens: int = 4096, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    """X (tokens x n_in) with strongly correlated, unequally scaled channels, like real activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, n_in, dtype=torch.float64)
    z = torch.randn(tokens, rank or n_in, generator=gen, dtype=torch.float64)
    return z @ mix[: rank or n_in]


def gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def output_error(w, w_hat, x) -> float:
    return float(((w.double() - w_hat.double()) @ x.T).norm())

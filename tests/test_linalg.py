import torch

from compressor import linalg


def test_batched_svd_matches_per_matrix_fp64():
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(48, 32, generator=gen) for _ in range(3)] + [torch.randn(16, 40, generator=gen)]
    for m, (u, s, vh) in zip(mats, linalg.svd(mats)):
        ref = torch.linalg.svdvals(m.double())
        assert torch.allclose(s.double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose((u * s) @ vh, m, atol=1e-4)


def test_split_factors_balanced_and_exact():
    m = torch.randn(30, 20, dtype=torch.float64)
    (u, s, vh), = linalg.svd([m], dtype=torch.float64)
    up, down = linalg.split_factors(u, s, vh, 5)
    assert up.shape == (30, 5) and down.shape == (5, 20)
    assert torch.allclose(up.norm(dim=0), down.norm(dim=1))
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert torch.allclose(up @ down, best)


def test_check_finite_names_tensor():
    import pytest

    from compressor.errors import CompressorError

    with pytest.raises(CompressorError, match="weight x contains NaN"):
        linalg.check_finite("weight x", torch.tensor([1.0, float("nan")]))

import pytest
import torch

from compressor.methods.lost import Lost, LostConfig, sparse_columns

from .helpers import correlated_inputs, gram, output_error


def _dense(f, n_in):
    w = f["up.weight"].double() @ f["down.weight"].double()
    w[:, f["sparse_cols"]] += f["sparse_values"].double()
    return w


def test_unweighted_residual_is_best_fit_on_its_columns():
    torch.manual_seed(0)
    w = torch.randn(24, 40, dtype=torch.float64)
    method = Lost(LostConfig(sparse_fraction=0.2, activation_weighted=False))
    f = method.decompose([w], [None], [4])[0]
    cols = f["sparse_cols"]
    assert cols.numel() == sparse_columns(40, 0.2) == 8 and torch.equal(cols, cols.sort().values)
    low = f["up.weight"].double() @ f["down.weight"].double()
    residual = w - low
    # Chosen columns are those with the largest residual norm; values equal the residual there.
    assert set(cols.tolist()) == set(residual.norm(dim=0).topk(8).indices.tolist())
    assert torch.allclose(f["sparse_values"].double(), residual[:, cols])
    assert float((w - _dense(f, 40)).norm()) == pytest.approx(float(residual.norm(dim=0).pow(2).sum() - residual[:, cols].norm(dim=0).pow(2).sum()) ** 0.5,
                                                              rel=1e-8)


def test_weighted_residual_is_output_optimal_on_its_columns():
    torch.manual_seed(1)
    w = torch.randn(24, 40, dtype=torch.float64)
    x = correlated_inputs(40)
    h = gram(x)
    method = Lost(LostConfig(sparse_fraction=0.2, activation_weighted=True, damp=0.0))
    f = method.decompose([w], [h], [4])[0]
    cols = f["sparse_cols"]
    low = f["up.weight"].double() @ f["down.weight"].double()
    residual = w - low
    # Least squares over the chosen columns: min_S ||(R - S E_J^T) X||.
    ref = torch.linalg.lstsq(x[:, cols], (residual @ x.T).T).solution.T
    assert torch.allclose(f["sparse_values"].double(), ref, rtol=1e-6, atol=1e-8)
    plain = Lost(LostConfig(sparse_fraction=0.2, activation_weighted=False)).decompose([w], [None], [4])[0]
    assert output_error(w, _dense(f, 40), x) < output_error(w, _dense(plain, 40), x)


def test_sparse_part_counts_in_budget():
    method = Lost(LostConfig(sparse_fraction=0.1, ratio=0.3, activation_weighted=False))
    shapes = {"a": (64, 128)}
    ranks = method.allocate(shapes, None)
    used = ranks["a"] * (64 + 128) + method.extra_params((64, 128))
    assert used <= 0.7 * 64 * 128 < used + 64 + 128

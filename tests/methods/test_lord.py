import pytest
import torch

from compressor.errors import CompressorError
from compressor.methods.lord import Lord, LordConfig
from compressor.methods.whiten import Whiten, WhitenConfig

from .helpers import correlated_inputs, gram, output_error


def test_data_variant_projects_onto_top_output_directions():
    torch.manual_seed(0)
    w = torch.randn(32, 48, dtype=torch.float64)
    x = correlated_inputs(48)
    h = gram(x)
    f = Lord(LordConfig(variant="data")).decompose([w], [h], [6])[0]
    up = f["up.weight"]
    assert torch.allclose(up.T @ up, torch.eye(6, dtype=torch.float64), atol=1e-10)
    lam = torch.linalg.eigvalsh(w @ h @ w.T).flip(0)
    err = output_error(w, up @ f["down.weight"], x)
    assert err == pytest.approx(float(lam[6:].sum().sqrt()) * x.shape[0] ** 0.5, rel=1e-6)
    # Same optimum as whitened truncation for a full-rank H.
    wf = Whiten(WhitenConfig(damp=0.0)).decompose([w], [h], [6])[0]
    assert err == pytest.approx(output_error(w, wf["up.weight"] @ wf["down.weight"], x), rel=1e-6)


def test_weight_variant_is_data_free_svd():
    method = Lord(LordConfig(variant="weight"))
    assert not method.needs_gram
    w = torch.randn(20, 30)
    f = method.decompose([w], [None], [5])[0]
    s = torch.linalg.svdvals(w.double())
    assert float((w.double() - (f["up.weight"] @ f["down.weight"]).double()).norm()) == pytest.approx(float(s[5:].square().sum().sqrt()), rel=1e-4)


def test_bad_variant():
    with pytest.raises(CompressorError, match="variant"):
        Lord(LordConfig(variant="pca"))

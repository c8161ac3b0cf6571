import pytest
import torch
from conftest import tiny_model
from torch import nn

from compressor import models
from compressor.distributed import Executor
from compressor.errors import CompressorError
from compressor.methods.eora import sensitivity
from compressor.methods.eora.sensitivity import output_roots, output_sensitivity, row_weights


def measure(*args, **kwargs):
    """output_sensitivity as one process runs it (the run's executor is the one-process one)."""
    return output_sensitivity(*args, executor=Executor(), **kwargs)


WINDOWS = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(2))


def reference(model, windows, full=False):
    """Per linear, sum over windows and tokens of (dL/dy)^2 (or dL/dy dL/dy^T) / tokens, by
    autograd in float64."""
    model = model.double()
    outs, sums = {}, {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: outs.__setitem__(n, out)) for n, _, m in models.iter_linears(model)]
    for window in windows:
        ids = window[None]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        grads = torch.autograd.grad(loss, list(outs.values()))
        for n, g in zip(outs, grads):
            g = g.reshape(-1, g.shape[-1])
            sums[n] = sums.get(n, 0) + (g.T @ g if full else g.square().sum(0))
    for h in hooks:
        h.remove()
    return {n: s / windows.numel() for n, s in sums.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_float64_autograd(arch):
    model = tiny_model(arch).double()
    want = reference(tiny_model(arch), WINDOWS)
    got = measure(model, WINDOWS, torch.device("cpu"))
    assert set(got) == set(want) and len(got) == sum(1 for _ in models.iter_linears(model))
    for n in want:
        assert got[n].dtype == torch.float64 and got[n].shape == want[n].shape
        assert torch.allclose(got[n], want[n], rtol=1e-8, atol=1e-14), n
    # no weight gradient was kept, and the weights' flags are as they were
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_full_matrix_matches_float64_autograd():
    model = tiny_model("llama").double()
    want = reference(tiny_model("llama"), WINDOWS, full=True)
    got = measure(model, WINDOWS, torch.device("cpu"), full=True)
    diag = measure(model, WINDOWS, torch.device("cpu"))
    assert set(got) == set(want)
    for n in want:
        out = want[n].shape[0]
        assert got[n].dtype == torch.float64 and got[n].shape == (out, out)
        assert torch.allclose(got[n], want[n], rtol=1e-8, atol=1e-14), n
        assert torch.allclose(got[n].diagonal(), diag[n], rtol=1e-10, atol=1e-16), n


def test_full_matrix_refuses_what_memory_cannot_hold(monkeypatch):
    monkeypatch.setattr(sensitivity, "host_memory", lambda: 1000)
    with pytest.raises(CompressorError, match=r"weighting: loss-full keeps an out x out float64 matrix per adapted linear, .* GiB here, more than half"):
        measure(tiny_model("llama"), WINDOWS[:1], torch.device("cpu"), full=True)
    assert measure(tiny_model("llama"), WINDOWS[:1], torch.device("cpu"))  # the diagonal still fits


def test_output_roots_invert_and_square_to_the_gram():
    g = torch.randn(50, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G = g.T @ g / 50
    root, inv_root = output_roots(G)
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(root @ root, G, atol=1e-10) and torch.allclose(root @ inv_root, eye, atol=1e-8)
    # a singular Gram (channels the loss ignores) still has a finite inverse root
    root, inv_root = output_roots(torch.diag(torch.tensor([4.0, 0.0, 1.0])))
    assert torch.isfinite(inv_root).all() and torch.allclose(root @ inv_root, torch.eye(3, dtype=torch.float64), atol=1e-8)


def test_selected_names_only():
    model = tiny_model("llama")
    names = {n for n, _, _ in models.iter_linears(model) if n.endswith("down_proj")}
    assert set(measure(model, WINDOWS[:1], torch.device("cpu"), names)) == names
    with pytest.raises(CompressorError, match="found no decoder linears"):
        measure(model, WINDOWS[:1], torch.device("cpu"), {"nope"})


def test_row_weights_are_safe_to_divide_by():
    w = row_weights(torch.tensor([4.0, 0.0, 1.0]))
    assert w.dtype == torch.float64 and (w > 0).all() and torch.allclose(w[[0, 2]], torch.tensor([2.0, 1.0], dtype=torch.float64))

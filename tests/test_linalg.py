import pytest
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


def _decayed(m, n, alpha=0.3, seed=0):
    """A float32 matrix with a known power-law spectrum (flat, like LLM weights) and its exact
    float64 singular values."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = (1 + torch.arange(k, dtype=torch.float64)) ** -alpha
    w = ((q1 * s) @ q2.T).float()
    return w, torch.linalg.svdvals(w.double())


def _trunc_error(w, u, s, vh, rank):
    up, down = linalg.split_factors(u, s, vh, rank)
    return float((w.double() - up.double() @ down.double()).norm() / w.double().norm())


@pytest.mark.parametrize("algorithm", ["full", "gram", "randomized"])
@pytest.mark.parametrize("shape", [(192, 256), (320, 128)])
def test_truncation_error_of_each_path_within_1e3_of_exact(algorithm, shape):
    w, exact_s = _decayed(*shape)
    rank = min(shape) // 4
    exact = float(exact_s[rank:].square().sum().sqrt() / exact_s.square().sum().sqrt())
    (u, s, vh), = linalg.svd([w], ranks=[rank], algorithm=algorithm)
    assert u.shape[1] >= rank and u.dtype == torch.float32
    err = _trunc_error(w, u, s, vh, rank)
    assert abs(err - exact) / exact < 1e-3
    # The range finder's last few singular values converge slowest; the error bound above is what counts.
    assert torch.allclose(s[:rank].double(), exact_s[:rank], rtol=1e-2 if algorithm == "randomized" else 1e-4)
    # Factors stay balanced and orthonormal, as split_factors assumes.
    assert torch.allclose(u[:, :rank].T @ u[:, :rank], torch.eye(rank), atol=1e-4)
    assert torch.allclose(vh[:rank] @ vh[:rank].T, torch.eye(rank), atol=1e-4)


def test_auto_picks_fast_paths_only_for_large_matrices_with_known_rank():
    cpu = torch.device("cpu")
    assert linalg.choose((100, 100), 10, cpu) == "full"
    assert linalg.choose((4096, 4096), None, cpu) == "full"
    assert linalg.choose((4096, 4096), 1638, cpu) == "gram"
    assert linalg.choose((11008, 4096), 2388, cpu) == "gram"
    assert linalg.choose((4096, 4096), 512, cpu) == "randomized"
    assert linalg.choose((4096, 4096), 512, cpu, "gesvda") == "full"  # CUDA-only driver
    with pytest.raises(Exception, match="unknown SVD algorithm"):
        linalg.choose((4096, 4096), 512, cpu, "magic")


def test_gram_path_fp64_matches_exact_and_handles_rank_deficiency():
    w = torch.randn(200, 12, dtype=torch.float64) @ torch.randn(12, 300, dtype=torch.float64)
    (u, s, vh), = linalg.svd([w], dtype=torch.float64, ranks=[40], algorithm="gram")
    ref = torch.linalg.svdvals(w)
    assert torch.allclose(s[:12], ref[:12], rtol=1e-10)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    up, down = linalg.split_factors(u, s, vh, 40)
    assert torch.allclose(up @ down, w, atol=1e-9 * float(w.norm()))


def test_mixed_ranks_shapes_and_memory_chunks_keep_order(monkeypatch):
    monkeypatch.setattr(linalg, "CPU_BATCH_BYTES", 1)  # forces one matrix per batched call
    mats = [_decayed(96, 64, seed=i)[0] for i in range(3)] + [_decayed(64, 80, seed=9)[0]]
    ranks = [8, 20, None, 5]
    for m, r, (u, s, vh) in zip(mats, ranks, linalg.svd(mats, ranks=ranks, algorithm="gram")):
        ref = torch.linalg.svdvals(m.double())
        k = r or min(m.shape)
        assert torch.allclose(s[:k].double(), ref[:k], rtol=1e-4, atol=1e-6)


def test_fast_paths_are_deterministic():
    w, _ = _decayed(256, 192)
    a = linalg.svd([w], ranks=[40], algorithm="randomized")[0]
    b = linalg.svd([w], ranks=[40], algorithm="randomized")[0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_svdvals_gram_path_matches_exact_energies(monkeypatch):
    monkeypatch.setattr(linalg, "FAST_MIN_DIM", 16)
    w, exact = _decayed(120, 90, alpha=1.0)
    s, = linalg.svdvals([w])
    assert torch.allclose(s.double().square(), exact.square(), atol=1e-6 * float(exact[0]) ** 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algorithm", ["auto", "full", "gram", "randomized", "gesvda"])
def test_cuda_paths_within_1e3_of_exact(algorithm):
    w, exact_s = _decayed(1024, 1536)
    for rank in (200, 600):
        exact = float(exact_s[rank:].square().sum().sqrt() / exact_s.square().sum().sqrt())
        (u, s, vh), = linalg.svd([w.cuda()], ranks=[rank], algorithm=algorithm)
        assert u.is_cuda
        err = _trunc_error(w, u.cpu(), s.cpu(), vh.cpu(), rank)
        assert abs(err - exact) / exact < 1e-3, (algorithm, rank, err, exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_svdvals_and_whitening_match_cpu():
    w, exact = _decayed(700, 900, alpha=0.5)
    s, = linalg.svdvals([w.cuda()])
    assert torch.allclose(s.cpu().double(), exact, rtol=1e-4, atol=1e-6)
    h = w.double().T @ w.double() / 700
    (sg, sg_inv), = linalg.whitening([h.cuda()])
    (sc, sc_inv), = linalg.whitening([h])
    assert torch.allclose(sg.cpu() @ sg.cpu().T, sc @ sc.T, atol=1e-8 * float(h.norm()))


def test_svd_signs_are_canonical_whatever_the_path():
    """Every path returns the same sign per component (the largest entry of each U column
    positive), so factors GPTQ later rounds are the same on every device and algorithm."""
    w, _ = _decayed(600, 700)
    w = w.double()
    got = {a: linalg.svd([w], dtype=torch.float64, ranks=[60], algorithm=a)[0] for a in ("full", "gram", "randomized")}
    for a, (u, s, vh) in got.items():
        top = u[:, :20]
        assert (top.gather(0, top.abs().argmax(0, keepdim=True)) > 0).all(), a
        # the same direction, not only up to sign: each top column points where the exact one does
        # (the randomized path is approximate on this flat spectrum, so only roughly)
        cos = (top * got["full"][0][:, :20]).sum(0)
        assert (cos > (0.999 if a == "gram" else 0.5)).all(), (a, cos.min())
    # -W has the same U (canonical) and negated Vh
    u, s, vh = linalg.svd([-w], dtype=torch.float64)[0]
    assert torch.allclose(u[:, :20], got["full"][0][:, :20], atol=1e-8)
    assert torch.allclose(vh[:20], -got["full"][2][:20], atol=1e-8)


def test_svdvals_are_float64_accurate_on_the_small_path():
    """Rank allocations threshold these: the small (LAPACK) path computes in float64 whatever the
    input dtype, so float32 and float64 weights give the same energies up to the input's rounding."""
    w, exact = _decayed(96, 64, alpha=1.0)
    s32, = linalg.svdvals([w.float()], dtype=torch.float64)
    s64, = linalg.svdvals([w.double()], dtype=torch.float64)
    assert torch.allclose(s32, s64, rtol=0, atol=1e-6 * float(s64[0]))
    assert torch.allclose(s64, torch.linalg.svdvals(w.double()), rtol=0, atol=1e-12 * float(s64[0]))

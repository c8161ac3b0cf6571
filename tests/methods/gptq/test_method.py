import pytest
import torch

from compressor import recipe
from compressor.errors import CompressorError
from compressor.methods.gptq import Gptq, GptqConfig, Rtn
from compressor.modules import LowRankLinear, ModuleSpec, QuantLinear, effective_weight


def correlated(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) @ (torch.randn(d, d, generator=gen) / d**0.5) * torch.exp(torch.randn(d, generator=gen) * 0.5)


def lowrank(in_f=128, out_f=96, rank=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = LowRankLinear(in_f, out_f, rank, bias=True)
    with torch.no_grad():
        m.down.weight.copy_(torch.randn(rank, in_f, generator=gen) / in_f**0.5)
        m.up.weight.copy_(torch.randn(out_f, rank, generator=gen) / rank**0.5)
        m.up.bias.copy_(torch.randn(out_f, generator=gen))
    return m


def test_lowrank_factors_padded_and_exact_to_dequantised():
    m = lowrank()
    X = correlated(1024, 128)
    H = (X.T.double() @ X.double()) / X.shape[0]
    new, spec = Gptq(GptqConfig(bits=4, group_size=32)).quantize_module(m, H, ModuleSpec("lowrank", 96, 128, True, rank=20))
    assert isinstance(new.down, QuantLinear) and isinstance(new.up, QuantLinear)
    assert spec.rank == new.rank == 24 and spec.quant == {"bits": 4, "group_size": 32}  # next multiple of 8
    W = effective_weight(new)
    assert torch.allclose(new(X), X @ W.T + new.up.bias, atol=1e-4)


def test_gptq_on_factors_beats_rtn():
    X = correlated(2048, 128, seed=1)
    H = (X.T.double() @ X.double()) / X.shape[0]
    ref = lowrank(seed=2)
    target = X @ (ref.up.weight @ ref.down.weight).detach().T
    errs = {}
    for cls in (Gptq, Rtn):
        new, _ = cls(GptqConfig(bits=3, group_size=32)).quantize_module(lowrank(seed=2), H, ModuleSpec("lowrank", 96, 128, False, rank=20))
        errs[cls.name] = (X @ effective_weight(new).T - target).norm()
    assert errs["gptq"] < 0.9 * errs["rtn"]


def test_check_names_layer_and_fix():
    g = Gptq(GptqConfig(bits=3, group_size=32))
    with pytest.raises(CompressorError, match="divisible by 32, but a.b is 48 x 64"):
        g.check({"a.b": (48, 64)}, set())
    g.check({"a.b": (48, 64)}, {"a.b"})  # a factorised layer pads its rank side instead


def test_recipe_validates_bits():
    with pytest.raises(CompressorError, match="key 'bits' must be one of 2, 3, 4, 8; got 5"):
        recipe.from_dict({"stages": [{"method": "gptq", "bits": 5}]})
    with pytest.raises(CompressorError, match="key 'rank_pattern' must be"):
        recipe.from_dict({"stages": [{"method": "gptq"}, {"method": "eora", "rank_pattern": {"mlp.*": "big"}}]})

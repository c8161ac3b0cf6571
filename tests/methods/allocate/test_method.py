"""The allocate stage end to end on tiny models: the budget holds, the bytes are the accounting's,
mixed widths reload, and bad budgets are one clear error."""

import json
import struct

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

import compressor
from compressor import recipe
from compressor.api import compress
from compressor.errors import CompressorError
from compressor.methods.allocate import parse_size
from compressor.methods.gptq import format as gptq_v1


def stages(mix="any", **budget):
    # group 32: the tiny models are 64 wide; a small set of ranks keeps the tests quick; mix any
    # (every width) unless a test is about the default's two adjacent widths
    return {"stages": [{"method": "allocate", "group_size": 32, "bits": [2, 3, 4, 8], "ranks": [0, 8], "weighting": "output", "mix": mix, **budget}]}


def run(tmp_path, name="out", model=None, samples=8, mix="any", **budget):
    out = tmp_path / name
    result = compress(model or tiny_model("llama"), recipe.from_dict(stages(mix, **budget)), out, tokenizer=byte_tokenizer(), samples=samples,
                      seq_len=32, device="cpu")
    return result, out


def payload(folder) -> int:
    """Bytes of tensor data in the folder's safetensors files (each: 8-byte header length, header, data)."""
    total = 0
    for path in folder.rglob("*.safetensors"):
        raw = path.read_bytes()
        total += len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]
    return total


@pytest.mark.parametrize("size", ["0.55x", "0.62x", "70%", "0.9x"])
def test_size_budget_holds_and_the_accounting_is_the_bytes_on_disk(tmp_path, size):
    result, out = run(tmp_path, size=size)
    entry = result.report["allocation"]
    assert result.report["output_bytes"] <= entry["budget_bytes"]
    assert payload(out) == entry["planned_bytes"]  # every tensor written, adapters included, to the byte
    assert entry["budget_bytes"] == int(float(size.rstrip("x%")) / (100 if size.endswith("%") else 1) * entry["dense_bytes"])


def test_more_budget_is_never_estimated_worse_and_mixes_widths(tmp_path):
    errors, widths = [], set()
    for i, bits in enumerate([3.2, 3.8, 4.8, 6.0, 9.0]):
        result, out = run(tmp_path, name=f"o{i}", bits_per_weight=bits)
        entry = result.report["allocation"]
        assert entry["linear_bits_per_weight"] <= bits
        errors.append(entry["estimated_error"])
        widths |= {v["bits"] for v in entry["per_linear"].values()}
    assert errors == sorted(errors, reverse=True)
    assert len(widths) >= 3


# the tiny model's uniform widths store 3.07, 4.07, 5.07 and 9.07 bits per weight (group 32)
@pytest.mark.parametrize("bits,widths", [(3.5, [2, 3]), (4.5, [3, 4]), (5.5, [4, 8]), (8.0, [4, 8]), (9.5, [8])])
def test_adjacent_mixes_the_widest_uniform_width_that_fits_and_the_next(tmp_path, bits, widths):
    result, _ = run(tmp_path, mix="adjacent", bits_per_weight=bits)
    entry = result.report["allocation"]
    assert entry["mix"] == "adjacent" and entry["widths"] == widths
    assert {v["bits"] for v in entry["per_linear"].values()} <= set(widths)
    assert entry["linear_bits_per_weight"] <= bits
    # the uniform allocation of the lower width fits, so the choice is estimated no worse than it
    low = next(u for u in entry["uniform"] if u["option"] == f"{widths[0]}-bit")
    assert low["fits"] and entry["estimated_error"] <= low["estimated_error"] * (1 + 1e-9)
    # the uniform options priced are the kept widths' only
    assert {int(u["option"].split("-")[0]) for u in entry["uniform"]} == set(widths)


def test_adjacent_is_the_default_and_any_is_every_width():
    assert recipe.from_dict({"stages": [{"method": "allocate", "bits_per_weight": 4}]}).stages[0].config.mix == "adjacent"
    with pytest.raises(CompressorError, match="mix"):
        recipe.from_dict({"stages": [{"method": "allocate", "bits_per_weight": 4, "mix": "neighbours"}]})


def test_mixed_widths_reload_with_the_same_logits_and_declare_each_width(tmp_path):
    result, out = run(tmp_path, bits_per_weight=4.6)
    entry = result.report["allocation"]
    assert len({v["bits"] for v in entry["per_linear"].values()}) > 1, "the test needs a mixed allocation"
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(compressor.load(out)(ids).logits, result.model(ids).logits, atol=1e-5)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    for name, chosen in entry["per_linear"].items():
        assert gptq_v1.declared_bits(config, name) == chosen["bits"]


def test_tied_groups_share_one_choice(tmp_path):
    result, _ = run(tmp_path, bits_per_weight=4.6)
    chosen = result.report["allocation"]["per_linear"]
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        assert chosen[f"{p}.self_attn.q_proj"] == chosen[f"{p}.self_attn.k_proj"] == chosen[f"{p}.self_attn.v_proj"]
        assert chosen[f"{p}.mlp.gate_proj"] == chosen[f"{p}.mlp.up_proj"]


def test_loss_weighting_estimates_a_loss_increase_and_records_the_sequential_one(tmp_path):
    out = tmp_path / "o"
    result = compress(tiny_model("qwen2"), recipe.from_dict({"stages": [{"method": "allocate", "group_size": 32, "bits": [2, 3, 4, 8], "ranks": [0, 8],
                                                                         "bits_per_weight": 3.6}]}),
                      out, tokenizer=byte_tokenizer(), samples=8, seq_len=32, device="cpu")
    entry = result.report["allocation"]
    assert entry["estimated_loss_increase"] == pytest.approx(entry["estimated_error"] / 2)
    assert entry["sequential_loss_increase"] > 0 and set(entry["per_linear_error"]) == set(entry["per_linear"])
    assert any(line.startswith("estimated loss increase") for line in result.report["actions"])


def test_same_seed_same_allocation(tmp_path):
    a, _ = run(tmp_path, name="a", bits_per_weight=4.0)
    b, _ = run(tmp_path, name="b", bits_per_weight=4.0)
    assert a.report["allocation"]["per_linear"] == b.report["allocation"]["per_linear"]


def test_a_budget_below_the_smallest_model_is_one_error_naming_the_least(tmp_path):
    with pytest.raises(CompressorError, match=r"below the smallest this model can be .* ask for at least"):
        run(tmp_path, size="0.05x")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CompressorError, match=r"--target-bits 2.0 is below the fewest bits per weight .* ask for at least"):
        run(tmp_path, bits_per_weight=2.0)


@pytest.mark.parametrize("value,expected", [("700MB", ("bytes", 7e8)), ("1.5 GB", ("bytes", 1.5e9)), ("512MiB", ("bytes", 512 * 2**20)),
                                            (123456, ("bytes", 123456.0)), ("0.75x", ("relative", 0.75)), ("75%", ("relative", 0.75))])
def test_sizes_parse(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["big", "-3MB", "1.5x", "0x", "10 parsecs", True, 0, "", "0.2B", "200TB", 10**15])
def test_bad_sizes_are_refused(value):
    with pytest.raises(CompressorError, match="size"):
        parse_size(value)


def test_budget_rules_at_recipe_time():
    with pytest.raises(CompressorError, match="exactly one budget"):
        recipe.from_dict({"stages": [{"method": "allocate"}]})
    with pytest.raises(CompressorError, match="exactly one budget"):
        recipe.from_dict({"stages": [{"method": "allocate", "size": "1MB", "bits_per_weight": 3}]})
    with pytest.raises(CompressorError, match="only stage"):
        recipe.from_dict({"stages": [{"method": "structured"}, {"method": "allocate", "bits_per_weight": 3}]})
    with pytest.raises(CompressorError, match="no stage of this recipe .* spends a size budget; use -r target"):
        recipe.load("gptq4", budget=recipe.budget_override(target_size="0.5x"))
    with pytest.raises(CompressorError, match="pass one of them"):
        recipe.budget_override("1MB", 3.0)
    shipped = recipe.load("target", budget=recipe.budget_override(target_bits=3.5))
    assert shipped.stages[0].config.bits_per_weight == 3.5 and shipped.stages[0].config.size is None


def test_streaming_refuses_loss_weighting():
    with pytest.raises(CompressorError, match="weighting: loss .* use weighting: output"):
        recipe.load("target").check_streamable()

"""The printed summary: rows with changes, and a verdict that says when quality collapsed."""

from __future__ import annotations

import pytest
from conftest import byte_tokenizer, tiny_model

from compressor import recipe as recipes
from compressor import summary
from compressor.api import compress


def report(before, after, **extra):
    return {
        "method": "whiten", "device": "cpu", "wall_seconds": 1.0, "dtype": "bfloat16",
        "params_before": 1000, "params_after": 800, "linear_params_before": 600, "linear_params_after": 400,
        "output_bytes": 1700, "source_bytes": 900, "per_module": {"a": 4, "b": "dense"},
        "eval": {"before": {"code_ppl": {"ppl": before}}, "after": {"code_ppl": {"ppl": after}}}, **extra,
    }


def test_collapse_is_named_with_what_to_try():
    lines = summary.render(report(6.1, 31005.0), "demo", "out", ["code_ppl"])
    verdict = lines[-1]
    assert verdict.startswith("verdict: quality collapsed") and "x5,082.8" in verdict and "--ratio" in verdict


def test_close_and_degraded():
    assert summary.verdict(report(10.0, 10.5), ["code_ppl"]) == "verdict: close to dense (code_ppl +5.0 %)"
    assert summary.verdict(report(10.0, 15.0), ["code_ppl"]).startswith("verdict: degraded (code_ppl +50.0 %)")
    assert summary.verdict(report(10.0, 15.0), []) is None


def test_rows_carry_size_against_dense_16_bit_and_changes():
    rows = {name: (b, a, c) for name, b, a, c in summary.rows(report(10.0, 11.0), ["code_ppl"])}
    assert rows["size on disk (MB, dense as bfloat16)"] == ("0.0", "0.0", "-15.0 %")  # 1000 params x 2 bytes -> 1700 bytes
    assert rows["parameters"][2] == "-20.0 %"
    assert rows["code_ppl"] == ("10.000", "11.000", "+10.0 %")
    lines = summary.render(report(10.0, 11.0, actions=["factorised 1 of 2 decoder linears"]), "demo", "out", ["code_ppl"])
    assert lines[1] == "  factorised 1 of 2 decoder linears"


@pytest.mark.parametrize("recipe,expected", [
    ({"stages": [{"method": "svd", "ratio": 0.3}]}, ["factorised 14 of 14 decoder linears with svd (ranks "]),
    ({"stages": [{"method": "magnitude", "ratio": 0.1}]}, ["MLP width 96 -> "]),
    ({"stages": [{"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}, {"method": "eora", "rank": 4}]},
     ["quantised the decoder linears with gptq to 4-bit, group 32, act-order", "eora adapters of rank 4 on 14 linears"]),
])
def test_every_stage_says_what_it_did(recipe, expected):
    """The lines come from the stages themselves (Method.summary_lines), so a plug-in method such as
    magnitude is described without the summary knowing it."""
    rec = recipes.from_dict(recipe)
    result = compress(tiny_model("llama"), rec, tokenizer=byte_tokenizer(), samples=4, seq_len=32, device="cpu")
    lines = summary.actions(result.report)
    assert len(lines) == len(expected)
    for line, start in zip(lines, expected):
        assert start in line, (line, start)

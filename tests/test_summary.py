"""The printed summary: rows with changes, and a verdict that says when quality collapsed."""

from __future__ import annotations

from compressor import summary


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
    lines = summary.render(report(10.0, 11.0), "demo", "out", ["code_ppl"])
    assert "  factorised 1 of 2 decoder linears (ranks 4..4)" in lines


def test_quantisation_and_adapters_are_described():
    r = report(10.0, 10.4, per_module={"a": "dense"},
               quantization={"method": "gptq", "bits": 4, "group_size": 128, "act_order": True, "effective_bits": 4.25},
               adapters={"method": "eora", "ranks": {"a": 32}, "params": 5000, "path": "adapter", "merged": False, "error_removed_mean": 0.4})
    text = "\n".join(summary.actions(r))
    assert "gptq to 4-bit, group 128, act-order, 4.25 bits per weight" in text
    assert "eora adapters of rank 32 on 1 linears (5,000 parameters, PEFT LoRA folder adapter/)" in text

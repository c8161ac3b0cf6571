"""compressor/curve.py and `compressor analyze --target-size/--target-bits`: the rows are what each
output folder stores and measures, every target row keeps its budget, the Pareto verdict follows
from the numbers, and bad input is one line before any compression, with no half-written files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer
from test_cli_eval import assert_clean_error, run
from transformers import AutoModelForCausalLM, LlamaConfig

from compressor import curve
from compressor.errors import CompressorError
from compressor.eval import plots
from compressor.export import accounting
from compressor.methods.allocate.options import quant_bytes

PNG = b"\x89PNG\r\n\x1a\n"
needs_plots = pytest.mark.skipif(not plots.available(), reason="matplotlib not installed")


def wide_llama():
    """A tiny llama whose widths (128, 256; k/v 64) the shipped recipes' group size 128 and 3-bit
    packing divide, with a context that holds their 512-token calibration windows."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=256, max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("curve") / "tiny"
    wide_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def row(name, kind, ppl, bits, size, **extra):
    return {"row": name, "kind": kind, "code_ppl": ppl, "stored_bits": bits, "size_bytes": size, "budget": {}, **extra}


def test_pareto_against_the_best_recipe_that_fits():
    rows = [row("dense", "dense", 10.0, 16.0, 1000),
            row("gptq4", "recipe", 12.0, 4.5, 400), row("gptq3", "recipe", 15.0, 3.5, 320), row("gptq8", "recipe", 10.1, 8.5, 650),
            row("t4.5", "target", 11.5, 4.49, 399, budget={"target_bits": 4.5}),  # gptq4 fits (4.5 <= 4.5): 11.5 <= 12
            row("t4", "target", 13.0, 3.9, 360, budget={"target_bits": 4.0}),  # only gptq3 fits: 13 <= 15
            row("t3.6", "target", 16.0, 3.6, 330, budget={"target_bits": 3.6}),  # gptq3 fits and is better
            row("t0.6x", "target", 11.0, 5.0, 590, budget={"target_size": "0.6x"}, budget_bytes=600),  # by bytes: gptq4 best, gptq8 too big
            row("t2", "target", 30.0, 2.4, 250, budget={"target_bits": 2.5})]  # nothing fits
    found = {v["row"]: v for v in curve.pareto(rows)}
    assert [v["row"] for v in curve.pareto(rows)] == ["t4.5", "t4", "t3.6", "t0.6x", "t2"]
    assert (found["t4.5"]["against"], found["t4.5"]["verdict"]) == ("gptq4", "better or equal")
    assert (found["t4"]["against"], found["t4"]["verdict"]) == ("gptq3", "better or equal")
    assert (found["t3.6"]["against"], found["t3.6"]["verdict"], found["t3.6"]["against_code_ppl"]) == ("gptq3", "worse", 15.0)
    assert (found["t0.6x"]["against"], found["t0.6x"]["verdict"]) == ("gptq4", "better or equal")
    rows[7]["budget_bytes"] = 700  # now gptq8 (650 bytes, ppl 10.1) fits and beats 11.0
    assert {v["row"]: v for v in curve.pareto(rows)}["t0.6x"]["verdict"] == "worse"
    assert (found["t2"]["against"], found["t2"]["verdict"]) == (None, "no recipe fits")
    equal = [row("u", "recipe", 12.0, 4.0, 1), row("t", "target", 12.0, 4.0, 1, budget={"target_bits": 4.0})]
    assert curve.pareto(equal)[0]["verdict"] == "better or equal"


def test_budgets_are_parsed_by_the_recipe_rules():
    assert curve.parse_bits(" 3.5, 4,") == [3.5, 4.0]
    assert curve.budgets_of(["0.75x", "700MB"], [3.5]) == [{"target_size": "0.75x"}, {"target_size": "700MB"}, {"target_bits": 3.5}]
    for sizes, bits, fragment in (([], [], "needs budgets"), (["7QB"], [], "key 'size'"), (["0.75x", "0.75x"], [], "given twice"),
                                  ([], [0.0], "bits_per_weight"), (["2x"], [], r"in \(0, 1\]")):
        with pytest.raises(CompressorError, match=fragment):
            curve.budgets_of(sizes, bits)
    with pytest.raises(CompressorError, match="numbers of bits"):
        curve.parse_bits("3.5,four")
    with pytest.raises(CompressorError, match="comma-separated list"):
        curve.split_list(" , ", "--against")


@needs_plots
def test_curve_on_a_tiny_model(folder, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "plots"
    result = curve.target_curve(str(folder), ["0.45x"], [5.0], ["gptq4"], eval_limit=2, eval_seq_len=64, device="cpu", samples=8, seq_len=64,
                                out_dir=out)
    saved = json.loads((out / "curve.json").read_text())
    assert saved == json.loads(json.dumps(result))
    rows = {r["row"]: r for r in saved["rows"]}
    assert list(rows) == ["dense", "target 0.45x", "target 5 bits", "gptq4"]
    model = wide_llama()
    shapes = {full: tuple(reversed(m.weight.shape)) for full, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in full}
    weights = sum(o * i for i, o in shapes.values())
    assert saved["dense_linear_weights"] == weights == sum(accounting.dense_linear_weights(model).values())
    assert rows["dense"]["stored_bits"] == 32 and saved["dtype"] == "float32"  # the source's dtype, as compress keeps it
    assert rows["gptq4"]["linear_bytes"] == sum(quant_bytes(o, i, 4, 128) for i, o in shapes.values())
    assert rows["target 5 bits"]["stored_bits"] <= 5.0
    assert rows["target 5 bits"]["linear_bytes"] * 8 / weights == pytest.approx(rows["target 5 bits"]["planned_linear_bits"], rel=1e-12)
    assert rows["target 0.45x"]["size_bytes"] <= rows["target 0.45x"]["budget_bytes"] <= 0.45 * rows["dense"]["size_bytes"]
    for r in rows.values():
        assert 1 < r["code_ppl"] < 1e4 and r["size_bytes"] > r["linear_bytes"]
    assert rows["gptq4"]["calibration"] == {"dataset": "code", "samples": 8, "seq_len": 64}  # the override reaches every row
    assert saved["verdicts"] == curve.pareto(saved["rows"]) and len(saved["verdicts"]) == 2
    assert (out / "curve.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in out.iterdir()) == ["curve.json", "curve.png"]
    assert list((tmp_path / "tmp").iterdir()) == []  # every compressed folder removed
    text = "\n".join(curve.lines(result))
    assert "target 5 bits" in text and "the best that fits" in text and f"wrote {out / 'curve.png'}" in text


def test_a_budget_the_model_cannot_meet_is_refused_before_compressing(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(curve, "compress", lambda *a, **k: pytest.fail("compressed before refusing the budget"))
    with pytest.raises(CompressorError, match="--target-bits 2.0 is below the fewest bits per weight"):
        curve.target_curve(str(folder), [], [4.5, 2.0], ["gptq4"], device="cpu", out_dir=tmp_path / "plots")
    with pytest.raises(CompressorError, match="unknown recipe 'gptq5'"):
        curve.target_curve(str(folder), [], [4.5], ["gptq4", "gptq5"], device="cpu")
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--target-bits", "4.5", "--against", "gptq4,nope", "--plots", "{plots}"], "unknown recipe 'nope'"),
    (["--target-size", " , ", "--plots", "{plots}"], "--target-size takes a comma-separated list"),
    (["--target-size", "0.7x,70QB", "--plots", "{plots}"], "key 'size' must be bytes"),
    (["--target-bits", "4.5,x", "--plots", "{plots}"], "numbers of bits per weight"),
    (["--target-bits", "4.5", "--against", "gptq4,gptq4", "--plots", "{plots}"], "names 'gptq4' twice"),
    (["--target-bits", "1", "--plots", "{plots}"], "--target-bits 1.0 is below the fewest bits per weight"),
    (["--target-bits", "4.5"], "needs --plots DIR"),
    (["--target-bits", "4.5", "-r", "svd", "--plots", "{plots}"], "needs no -r/--recipe"),
    (["--against", "gptq4"], "--against belongs to a curve"),
])
def test_bad_curve_arguments_are_one_line(monkeypatch, capsys, folder, tmp_path, args, fragment):
    plots_dir = tmp_path / "plots"
    argv = [a.replace("{plots}", str(plots_dir)) for a in args]
    assert_clean_error(run(monkeypatch, capsys, "analyze", folder, "--device", "cpu", *argv), fragment)
    assert not plots_dir.exists() or list(plots_dir.iterdir()) == []


@needs_plots
def test_analyze_draws_the_curve_with_the_shipped_recipes(monkeypatch, capsys, caplog, folder, tmp_path):
    code, stdout, err = run(monkeypatch, capsys, "analyze", folder, "--target-bits", "4.5,6", "--eval-limit", "2", "--eval-seq-len", "64",
                            "--device", "cpu", "--plots", tmp_path / "plots")
    assert code == 0, err
    saved = json.loads((tmp_path / "plots" / "curve.json").read_text())
    rows = {r["row"]: r for r in saved["rows"]}
    assert list(rows) == ["dense", "target 4.5 bits", "target 6 bits", "gptq4"]
    assert rows["gptq4"]["calibration"]["samples"] == 64 and rows["target 6 bits"]["calibration"]["samples"] == 32  # as shipped
    assert all(rows[f"target {b:g} bits"]["stored_bits"] <= b for b in (4.5, 6))
    assert (tmp_path / "plots" / "curve.png").read_bytes()[:8] == PNG
    assert "the best that fits" in stdout and f"wrote {tmp_path / 'plots' / 'curve.json'}" in stdout
    progress = [r.getMessage() for r in caplog.records if r.name == "compressor.progress" and r.getMessage().startswith("size-quality curve")]
    assert "size-quality curve: measuring gptq4" in progress and any(m.startswith("size-quality curve: 4/4 row") for m in progress)


def test_plain_analyze_is_unchanged(monkeypatch, capsys, folder):
    code, stdout, err = run(monkeypatch, capsys, "analyze", folder, "-r", "svd", "--summary-only", "--device", "cpu")
    assert code == 0, err
    assert "targeted linears factorised" in stdout and "curve" not in stdout + err

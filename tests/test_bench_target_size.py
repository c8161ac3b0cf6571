"""benchmarks/target_size.py: its rows are the recipes they claim (the shipped 'target' one with the
budget set), its size accounting counts exactly what each export stores for the decoder linears,
its summaries compute what they say, and a run on a tiny model folder writes every row, the JSON
and the PNG (never run on the real model here)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import byte_tokenizer, load_benchmark, tiny_model

from compressor import models, recipe
from compressor.errors import CompressorError
from compressor.export import accounting
from compressor.methods.allocate.options import quant_bytes

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "target_size.py"
bench = load_benchmark("target_size")


def test_defaults_are_the_issue_rows():
    args = bench.parse_args([])
    assert args.row_names == ["dense", "gptq2", "gptq2-eora32", "gptq3", "gptq3-eora32", "gptq4", "gptq4-eora32",
                              "target-2.5", "target-3.0", "target-3.5", "target-4.0", "target-4.5"]
    assert (args.samples, args.seq_len, args.limit, args.eval_seq_len, args.group_size) == (32, 512, 8, 512, 128)
    assert bench.parse_args(["--adapters", "without", "--rows", "target-3.0,gptq3,dense"]).row_names == ["dense", "gptq3", "target-3.0"]
    assert bench.parse_args(["--adapters", "with", "--uniform-bits", "4"]).row_names[:2] == ["dense", "gptq4-eora32"]


@pytest.mark.parametrize("argv", [["--rows", "dense,gptq5"], ["--bits", "0"], ["--bits", "3", "3"], ["--samples", "0"],
                                  ["--adapters", "without", "--rows", "gptq3-eora32"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_target_rows_are_the_shipped_recipe_with_the_budget_set():
    ours = recipe.from_dict(bench.target_recipe(3.0, 128, 32, 512), source="t").to_dict()
    shipped = recipe.load("target", budget=recipe.budget_override(target_bits=3.0)).to_dict()
    assert ours["stages"] == shipped["stages"] and ours["calibration"] == shipped["calibration"]
    assert ours["stages"][0]["bits_per_weight"] == 3.0 and ours["stages"][0]["size"] is None
    small = bench.target_recipe(3.0, 32, 4, 32)
    assert small["stages"][0]["group_size"] == 32 and (small["calibration"]["samples"], small["calibration"]["seq_len"]) == (4, 32)


def test_uniform_rows_share_the_target_grid_and_calibration():
    target = bench.target_recipe(3.0, 128, 32, 512)
    grid = target["stages"][0]
    for name in ("gptq2", "gptq3-eora32", "gptq4"):
        data = bench.uniform_recipe(name, 128, 32, 512)
        built = recipe.from_dict(data, source=name).to_dict()
        gptq = built["stages"][0]
        assert gptq["method"] == "gptq" and gptq["bits"] == int(name[4])
        assert {k: gptq[k] for k in ("group_size", "sym", "act_order", "damp")} == {k: grid[k] for k in ("group_size", "sym", "act_order", "damp")}
        assert built["calibration"] == recipe.from_dict(target, source="t").to_dict()["calibration"]
        if "eora" in name:
            eora = built["stages"][1]
            assert (eora["rank"], eora["weighting"], eora["sequential"], eora["refine"], eora["propagation"]) == (32, "output", True, 0, 0.0)
        else:
            assert len(built["stages"]) == 1


def test_spearman_and_interpolation_against_hand_values():
    assert bench.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert bench.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # ties share their mean rank: x ranks 1.5 1.5 3 4 against 1 2 3 4
    assert bench.spearman([5, 5, 7, 9], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert bench.spearman([1, 2], [2, 1]) is None and bench.spearman([1, 1, 1], [1, 2, 3]) is None
    pts = [(4.0, 6.0), (2.0, 10.0), (3.5, 7.0)]
    assert bench.interpolate(pts, 3.0) == pytest.approx(8.0)
    assert bench.interpolate(pts, 3.75) == pytest.approx(6.5)
    assert bench.interpolate(pts, 4.0) == 6.0 and bench.interpolate(pts, 1.9) is None and bench.interpolate(pts, 4.1) is None


def test_a_folder_with_other_module_names_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(CompressorError, match="no tensor of"):
        accounting.linear_bytes(tmp_path, ["model.layers.0.self_attn.q_proj", "transformer.h.0.attn.c_attn"])


def test_run_on_a_tiny_model(tmp_path):
    folder = tmp_path / "tiny"
    model = tiny_model("llama")
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    shapes = {full: models.linear_shape(m) for full, _, m in models.iter_linears(model)}
    weights = sum(o * i for o, i in shapes.values())
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    done = subprocess.run([sys.executable, str(BENCH), "--model", str(folder), "--samples", "4", "--seq-len", "32", "--limit", "2",
                           "--eval-seq-len", "64", "--group-size", "32", "--bits", "3.0", "4.5", "6.0", "--json", str(out), "--png", str(png),
                           "--out-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    res = json.loads(out.read_text())
    rows = {r["row"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "gptq2", "gptq2-eora32", "gptq3", "gptq3-eora32", "gptq4", "gptq4-eora32", "target-3.0", "target-4.5",
                          "target-6.0"]
    assert res["dense_linear_weights"] == weights and res["dtype"] == "bfloat16"
    # 3-bit g32 (the target recipe's narrowest width) stores over 4 bits per weight here: the 3.0
    # budget is refused, and the run goes on
    assert set(rows.pop("target-3.0")) == {"row", "error"} and "| target-3.0 | - |" in done.stdout
    assert all(math.isfinite(r["code_ppl"]) and r["code_ppl"] > 1 for r in rows.values())
    # the accounting, against what each format stores: bfloat16 weights; GPTQ v1 codes, scales,
    # zeros and g_idx at group 32; plus rank-32 bfloat16 adapter factors
    assert rows["dense"]["linear_bytes"] == 2 * weights and rows["dense"]["stored_bits"] == 16
    for b in (2, 3, 4):
        quant = sum(quant_bytes(o, i, b, 32) for o, i in shapes.values())
        assert rows[f"gptq{b}"]["linear_bytes"] == quant
        assert rows[f"gptq{b}-eora32"]["linear_bytes"] == quant + sum(32 * (o + i) * 2 for o, i in shapes.values())
    for b in (4.5, 6.0):
        row = rows[f"target-{b}"]
        assert row["target_bits"] == b
        stored = row["linear_bytes"] * 8 / weights
        assert stored <= b
        assert stored == pytest.approx(row["planned_linear_bits"], rel=1e-12)  # the plan is what was written
        assert row["size_bytes"] == row["output_bytes"] and sum(row["counts"].values()) == len(shapes)
        assert row["estimated_error"] > 0 and row["recipe"]["stages"][0]["bits_per_weight"] == b
    assert {u["option"] for u in res["uniform_estimates"]} >= {"3-bit", "4-bit", "8-bit"}
    assert res["summary"][0].startswith("(a) Pareto check") and any("gptq3 (" in line for line in res["summary"])
    assert "(b) moonshot at 3.0 bits: needs" in done.stdout  # target-3.0 was refused
    assert "target rows + plain GPTQ rows (the report's uniform estimates): rho" in done.stdout
    assert "| target-4.5 |" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any((tmp_path / "work").iterdir())  # folders deleted once measured (no --keep)

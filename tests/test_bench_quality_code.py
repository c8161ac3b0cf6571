"""benchmarks/quality_code.py: its rows are the recipes they claim (the shipped ones where they
exist), its arguments are checked, its table compares rows problem by problem, and a run on a tiny
model folder writes every row (never run on the real model here)."""

import json

import pytest
from conftest import byte_tokenizer, load_benchmark, tiny_model

from compressor import recipe

bench = load_benchmark("quality_code")


def test_defaults_are_every_row_and_all_problems():
    args = bench.parse_args([])
    assert args.row_names == list(bench.ROWS) and args.problems == 164 and args.model == bench.MODEL_ALIAS
    assert {"dense", "structured30-heal", "whiten20-heal", "gptq4", "gptq4-eora32", "gptq3", "gptq3-eora32"} <= set(bench.ROWS)


@pytest.mark.parametrize("argv", [["--rows", "dense,nope"], ["--problems", "0"], ["--problems", "165"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


@pytest.mark.parametrize("row,shipped", [("gptq4", "gptq4"), ("gptq4-eora32", "gptq4-eora32"), ("structured10-heal", "structured10-heal"),
                                         ("structured20-heal", "structured20-heal")])
def test_rows_are_the_shipped_recipes(row, shipped):
    ours = recipe.from_dict(bench.recipe_for(row), source=row).to_dict()
    theirs = recipe.load(shipped).to_dict()
    assert ours["stages"] == theirs["stages"]
    assert ours["calibration"] == theirs["calibration"]


def test_every_row_is_a_valid_recipe():
    for name, stages in bench.ROWS.items():
        if stages is not None:
            built = recipe.from_dict(bench.recipe_for(name, samples=4, seq_len=32), source=name)
            assert [s.name for s in built.stages] == [s["method"] for s in stages]
    assert recipe.from_dict(bench.recipe_for("gptq3-eora32")).stages[0].config.bits == 3


def test_table_gives_share_of_dense_and_problems_gained_and_lost():
    result = {"eval": {"problems": 4}, "rows": {
        "dense": {"pass@1": 0.5, "solved": ["a", "b"], "code_ppl": 2.0, "wikitext2_ppl": 9.0, "disk_mb": 100.0, "compress_seconds": 0.0},
        "structured20": {"pass@1": 0.25, "solved": ["b"], "code_ppl": 2.5, "wikitext2_ppl": 12.0, "disk_mb": 80.0, "compress_seconds": 30.0},
        "structured20-heal": {"pass@1": 0.5, "solved": ["b", "c"], "code_ppl": 2.2, "wikitext2_ppl": 10.0, "disk_mb": 80.0, "compress_seconds": 90.0},
    }}
    lines = bench.table(result).splitlines()
    assert "4 problems" in lines[0] and len(lines) == 5
    assert lines[3].startswith("| structured20 | 0.250 | 50 % | +0 / -1 | 2.50 | 12.00 | 80 | 30 |")
    assert lines[4].startswith("| structured20-heal | 0.500 | 100 % | +1 / -1 |")


def test_a_run_on_a_tiny_model_writes_every_row(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "q.json"
    argv = ["--model", str(folder), "--rows", "dense,structured10-heal", "--problems", "1", "--max-new-tokens", "4", "--eval-limit", "1",
            "--eval-seq-len", "32", "--samples", "4", "--calib-seq-len", "32", "--device", "cpu", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert list(result["rows"]) == ["dense", "structured10-heal"]
    healed = result["rows"]["structured10-heal"]
    assert healed["disk_mb"] <= result["rows"]["dense"]["disk_mb"] and healed["compress_seconds"] > 0 and "heal_seconds" in healed
    assert 0.0 <= healed["pass@1"] <= 1.0 and healed["code_ppl"] > 1
    assert "| structured10-heal |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="problems"):  # --keep refuses a file measured another way
        bench.main([*argv, "--keep", "--problems", "2"])

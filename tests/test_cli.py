"""The command line as a user runs it: a subprocess, exit codes, files left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import byte_tokenizer, tiny_model
from safetensors.torch import load_file, save_file


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _assert_clean_error(proc, out, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


def test_compress_then_eval(model_dir, tmp_path):
    out = tmp_path / "out"
    proc = run("compress", model_dir, "-r", "welore", "--ratio", "0.3", "-o", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "decoder-linear parameters" in proc.stdout
    report = json.loads((out / "compression_report.json").read_text())
    for key in ("method", "target_ratio", "params_before", "params_after", "linear_params_before",
                "linear_params_after", "per_module", "wall_seconds", "device", "versions"):
        assert key in report
    assert report["method"] == "welore" and report["target_ratio"] == 0.3
    assert {"config.json", "model.safetensors", "modeling_compressed.py", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask, "the output folder is as readable as any folder mkdir makes"

    results = tmp_path / "results.json"
    proc = run("eval", out, "--tasks", "code_ppl", "--seq-len", "64", "--limit", "4", "-o", results, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    ppl = json.loads(results.read_text())["tasks"]["code_ppl"]["ppl"]
    assert 1.0 < ppl < float("inf")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["-r", "welore", "--ratio", "1.5"], "'--ratio': 1.5 is not in the range 0<x<1"),
        (["-r", "nope"], "unknown recipe 'nope'"),
        ([], "no recipe: pass -r RECIPE"),
        (["--target-size", "0.5x", "--target-bits", "3"], "pass one of them"),
        (["--target-size", "big"], "key 'size' must be bytes"),
        (["-r", "gptq4", "--target-size", "0.5x"], "spends a size budget; use -r target"),
        # the shipped target recipe's group of 128 does not divide the tiny model's 64 features
        (["--target-bits", "4", "--samples", "4", "--seq-len", "32"], "no option fits"),
    ],
)
def test_bad_options(model_dir, tmp_path, extra, fragment):
    out = tmp_path / "out"
    _assert_clean_error(run("compress", model_dir, *extra, "-o", out, "--device", "cpu"), out, fragment)


def test_target_size_with_a_recipe_file(model_dir, tmp_path):
    recipe = tmp_path / "budget.yaml"
    recipe.write_text("stages:\n  - method: allocate\n    bits_per_weight: 4.25\n    group_size: 32\n    ranks: [0, 8]\n    weighting: output\n")
    out = tmp_path / "out"
    proc = run("compress", model_dir, "-r", recipe, "--target-size", "0.8x", "-o", out, "--device", "cpu", "--samples", "4", "--seq-len", "32")
    assert proc.returncode == 0, proc.stderr
    assert "target size 0.8x:" in proc.stdout and "allocation over 14 decoder linears" in proc.stdout
    report = json.loads((out / "compression_report.json").read_text())
    assert sum(f.stat().st_size for f in out.rglob("*.safetensors")) <= report["allocation"]["budget_bytes"]


def test_missing_model(tmp_path):
    out = tmp_path / "out"
    _assert_clean_error(run("compress", tmp_path / "nowhere", "-r", "svd", "-o", out), out, "nowhere")


def test_bad_recipe_file(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: svd\n    rank_ratio: 0.2\n")
    out = tmp_path / "out"
    _assert_clean_error(run("compress", model_dir, "-r", recipe, "-o", out), out, "unknown key 'rank_ratio'")


def test_rank_too_large(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: svd\n    rank: 1000\n")
    out = tmp_path / "out"
    _assert_clean_error(run("compress", model_dir, "-r", recipe, "-o", out, "--device", "cpu"), out, "rank 1000 is larger")


def test_unsupported_architecture(tmp_path):
    from transformers import AutoModelForCausalLM, FalconConfig

    path = tmp_path / "falcon"
    AutoModelForCausalLM.from_config(FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=256)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    out = tmp_path / "out"
    _assert_clean_error(run("compress", path, "-r", "svd", "-o", out), out, "unsupported architecture 'falcon'; supported: ")


def test_nan_weights(model_dir, tmp_path):
    bad = tmp_path / "nan-model"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(bad / "model.safetensors")
    key = next(k for k in weights if "q_proj" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    _assert_clean_error(run("compress", bad, "-r", "svd", "-o", out, "--device", "cpu"), out, "NaN or Inf")


def test_existing_output_refused_then_overwritten(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run("compress", model_dir, "-r", "svd", "-o", out, "--device", "cpu")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    proc = run("compress", model_dir, "-r", "svd", "-o", out, "--device", "cpu", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_recipes_lists_shipped():
    proc = run("recipes")
    assert proc.returncode == 0 and "welore" in proc.stdout


def test_progress_lines_when_stderr_is_not_a_terminal(model_dir, tmp_path):
    out = tmp_path / "out"
    proc = run("compress", model_dir, "-r", "whiten", "-o", out, "--device", "cpu", "--samples", "4", "--seq-len", "32",
               "--eval", "code_ppl", "--eval-limit", "2", "--eval-seq-len", "32")
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("compressor.progress:")]
    assert any("compressing (whiten): 1/2 layers" in line and "elapsed" in line for line in progress), proc.stderr
    assert any("compressing (whiten): 2/2 layers" in line for line in progress)
    assert any("perplexity: 2/2 windows" in line for line in progress)
    assert any("calibration" in line for line in progress)


def test_bad_arguments_fail_before_the_model_loads(model_dir, tmp_path):
    """A bad recipe is reported without importing transformers (so in about a second)."""
    code = (
        "import sys\nfrom compressor.cli import main\n"
        f"sys.argv = ['compressor', 'compress', {str(model_dir)!r}, '-r', 'nope', '-o', {str(tmp_path / 'o')!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'transformers' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert "unknown recipe 'nope'" in proc.stderr


def test_listing_recipes_imports_no_torch():
    """`compressor recipes` reads the YAML only: it answers before torch would have loaded."""
    code = (
        "import sys\nfrom compressor.cli import main\nsys.argv = ['compressor', 'recipes']\ncode = 0\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nprint(code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split()[-2:] == ["0", "False"], proc.stderr


def test_summary_shows_size_dtype_changes_and_what_was_done(model_dir, tmp_path):
    out = tmp_path / "out"
    proc = run("compress", model_dir, "-r", "structured", "-o", out, "--device", "cpu", "--samples", "4", "--seq-len", "32",
               "--dtype", "bfloat16", "--eval", "code_ppl", "--eval-limit", "2", "--eval-seq-len", "32")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "MLP width 96 -> 64 in all 2 layers" in text
    assert "size on disk (MB, dense as bfloat16)" in text and "dtype" in text and "bfloat16" in text
    assert "code_ppl" in text and "%" in text and "verdict:" in text
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"BF16"}
    report = json.loads((out / "compression_report.json").read_text())
    assert report["dtype"] == "bfloat16"


def test_output_keeps_the_source_dtype(tmp_path):
    import torch

    src = tmp_path / "half"
    tiny_model("llama").to(torch.float16).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    proc = run("compress", src, "-r", "svd", "--ratio", "0.2", "-o", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "compression_report.json").read_text())["dtype"] == "float16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}


def test_recipes_marks_one_recommendation_per_goal():
    proc = run("recipes")
    marks = [line for line in proc.stdout.splitlines() if "[recommended:" in line]
    goals = [line.split("[recommended:")[1] for line in marks]
    assert len(goals) == len(set(goals)) == 3, proc.stdout

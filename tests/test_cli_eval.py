"""`compressor eval`, `compare` and `analyze` as a user runs them (in-process through `main`)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import byte_tokenizer, tiny_model

from compressor import cli
from compressor.eval import plots


def run(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["compressor", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(result, fragment):
    code, _, err = result
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from eval.test_humaneval import tiny_llama_long_context

    path = tmp_path_factory.mktemp("cli-eval") / "dense"
    tok = byte_tokenizer()
    tok.eos_token = "Ā"
    tiny_llama_long_context().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def compressed(dense):
    from compressor.api import compress

    out = dense.parent / "welore30"
    compress(str(dense), "welore", out, ratio=0.3, device="cpu")
    return out


def test_eval_every_builtin_task(monkeypatch, capsys, compressed, tmp_path):
    out = tmp_path / "results.json"
    code, stdout, err = run(
        monkeypatch, capsys, "eval", compressed, "--tasks", "code_ppl,wikitext2_ppl,humaneval", "--limit", "2",
        "--seq-len", "32", "--max-new-tokens", "8", "--batch-size", "2", "--device", "cpu", "-o", out,
    )
    assert code == 0, err
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == ["code_ppl", "wikitext2_ppl", "humaneval"]
    for task in ("code_ppl", "wikitext2_ppl"):
        assert res["tasks"][task]["windows"] == 2 and 1.0 < res["tasks"][task]["ppl"] < 1e6
    he = res["tasks"]["humaneval"]
    assert he["n_problems"] == 2 and he["pass@1"] == 0.0
    assert all(s in ("failed", "timeout", "error") for t in he["per_task"].values() for s in t["statuses"])
    assert res["model_info"]["compression"]["method"] == "welore"
    assert "humaneval: pass@1 0.000 (2 problems x 1 samples, greedy)" in stdout


def test_eval_applies_the_adapter_unless_told_not_to(monkeypatch, capsys, dense, tmp_path):
    """An EoRA folder is evaluated as compressed (base + out/adapter), the same perplexity as the
    model compress returned; --no-adapter gives the base's."""
    from compressor import recipe
    from compressor.api import compress
    from compressor.eval.tasks import run_tasks

    rec = recipe.from_dict({"stages": [{"method": "gptq", "group_size": 32}, {"method": "eora", "rank": 4, "sequential": False}]})
    out = tmp_path / "eora"
    model = compress(str(dense), rec, out, samples=4, seq_len=32, device="cpu").model
    want = run_tasks(model, byte_tokenizer(), ["code_ppl"], 32, 2, "cpu")["code_ppl"]["ppl"]
    got = {}
    for flag in ("--adapter", "--no-adapter"):
        code, _, err = run(monkeypatch, capsys, "eval", out, "--tasks", "code_ppl", "--limit", "2", "--seq-len", "32", "--device", "cpu", flag,
                           "-o", tmp_path / f"{flag}.json")
        assert code == 0, err
        got[flag] = json.loads((tmp_path / f"{flag}.json").read_text())
    assert got["--adapter"]["adapters_applied"] and not got["--no-adapter"]["adapters_applied"]
    assert abs(got["--adapter"]["tasks"]["code_ppl"]["ppl"] - want) <= 1e-4 * want
    assert got["--no-adapter"]["tasks"]["code_ppl"]["ppl"] != got["--adapter"]["tasks"]["code_ppl"]["ppl"]


def test_self_check_on_a_subset(monkeypatch, capsys, tmp_path):
    out = tmp_path / "check.json"
    code, stdout, err = run(monkeypatch, capsys, "eval", "--self-check", "--limit", "6", "-o", out)
    assert code == 0, err
    assert "canonical solutions: 6/6 pass" in stdout and "self-check passed" in stdout
    assert "broken solutions (return_none): 6/6 fail" in stdout
    assert json.loads(out.read_text())["ok"] is True


def test_self_check_fails_when_the_harness_is_wrong(monkeypatch, capsys):
    from compressor.eval import humaneval

    # A harness that forgot to call check() would pass everything: the broken solutions expose it.
    monkeypatch.setattr(humaneval, "build_program", lambda problem, completion: problem["prompt"] + completion)
    code, stdout, _ = run(monkeypatch, capsys, "eval", "--self-check", "--limit", "3")
    assert code == 1 and "self-check FAILED" in stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--tasks", "code_ppl", "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
        (["--tasks", "code_ppl,code_ppl"], "given twice"),
        (["--tasks", "humaneval", "--samples-per-task", "4", "--temperature", "0"], "needs --temperature > 0"),
        (["--tasks", "humaneval", "--pass-k", "1,x"], "--pass-k takes comma-separated integers"),
        (["--tasks", "humaneval", "--pass-k", "5"], "pass@k needs 1 <= k <= n"),
    ],
)
def test_eval_bad_options(monkeypatch, capsys, dense, args, fragment):
    assert_clean_error(run(monkeypatch, capsys, "eval", dense, "--limit", "1", "--device", "cpu", *args), fragment)


def test_eval_without_model_or_with_both(monkeypatch, capsys, dense):
    assert_clean_error(run(monkeypatch, capsys, "eval"), "missing MODEL")
    assert_clean_error(run(monkeypatch, capsys, "eval", dense, "--self-check"), "takes no MODEL")


def test_eval_unknown_task_without_lm_eval(monkeypatch, capsys, dense):
    from compressor.eval import lmeval

    monkeypatch.setattr(lmeval, "available", lambda: False)
    assert_clean_error(run(monkeypatch, capsys, "eval", dense, "--tasks", "humaneva"), "did you mean 'humaneval'")


def test_compare_reuses_results_and_evaluates_models(monkeypatch, capsys, dense, compressed, tmp_path):
    dense_json = tmp_path / "dense.json"
    code, _, err = run(monkeypatch, capsys, "eval", dense, "--tasks", "code_ppl", "--limit", "3", "--seq-len", "32", "--device", "cpu", "-o", dense_json)
    assert code == 0, err
    table = tmp_path / "table.md"
    code, stdout, err = run(
        monkeypatch, capsys, "compare", dense_json, compressed, "--tasks", "code_ppl", "--limit", "3", "--seq-len", "32",
        "--device", "cpu", "-o", table, *(["--plot", tmp_path / "cmp.png"] if plots.available() else []),
    )
    assert code == 0, err
    data = json.loads((tmp_path / "table.json").read_text())
    ref, comp = data["rows"]
    assert ref["label"] == "dense" and comp["label"] == "welore30"
    assert comp["parameters"] < ref["parameters"]
    assert comp["change"]["parameters"] == pytest.approx(comp["parameters"] / ref["parameters"] - 1)
    ppl_ref, ppl_comp = ref["metrics"]["code_ppl/ppl"], comp["metrics"]["code_ppl/ppl"]
    assert comp["change"]["code_ppl/ppl"] == pytest.approx(ppl_comp / ppl_ref - 1)
    assert data["warnings"] == []
    md = table.read_text()
    assert md.splitlines()[0] == "| model | parameters | size on disk | code_ppl ↓ | eval time |"
    assert f"{ppl_comp:.3f} ({ppl_comp / ppl_ref - 1:+.1%})" in md
    assert md in stdout
    if plots.available():
        assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_flags_runs_that_do_not_match(tmp_path):
    from compressor.eval import report

    a = {"model": "a", "tasks": {"code_ppl": {"ppl": 10.0, "windows": 4, "seq_len": 64}}}
    b = {"model": "b", "tasks": {"code_ppl": {"ppl": 12.0, "windows": 8, "seq_len": 64}}}
    table = report.compare([a, b])
    assert len(table["warnings"]) == 1 and "not comparable" in table["warnings"][0]
    assert table["rows"][1]["change"]["code_ppl/ppl"] == pytest.approx(0.2)
    pass_a = {"model": "a", "tasks": {"humaneval": {"pass@1": 0.30, "n_problems": 5}}}
    pass_b = {"model": "b", "tasks": {"humaneval": {"pass@1": 0.20, "n_problems": 5}}}
    # Rates change additively: 0.30 -> 0.20 is -0.10, not -33%.
    assert report.compare([pass_a, pass_b])["rows"][1]["change"]["humaneval/pass@1"] == pytest.approx(-0.10)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["only-one.json"], "Missing argument"),
        (["nowhere.json", "also.json"], "results file nowhere.json does not exist"),
    ],
)
def test_compare_bad_input(monkeypatch, capsys, tmp_path, args, fragment):
    code, _, err = run(monkeypatch, capsys, "compare", *args, "-o", tmp_path / "t.md")
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "t.md").exists()


def test_compare_rejects_a_file_that_is_not_results(monkeypatch, capsys, tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"hello": 1}')
    assert_clean_error(run(monkeypatch, capsys, "compare", bogus, bogus, "-o", tmp_path / "t.md"), "not a results file")


@pytest.mark.skipif(not plots.available(), reason="matplotlib not installed")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_analyze_draws_spectra_and_ranks(monkeypatch, capsys, tmp_path, arch):
    path = tmp_path / arch
    tiny_model(arch).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    code, stdout, err = run(monkeypatch, capsys, "analyze", path, "-r", "welore", "--ratio", "0.3", "--device", "cpu", "--plots", tmp_path / "plots")
    assert code == 0, err
    assert "targeted linears factorised" in stdout and "kept energy" in stdout
    for name in ("spectra.png", "ranks.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]


def test_analyze_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(plots, "available", lambda: False)
    assert_clean_error(run(monkeypatch, capsys, "analyze", "demo", "--plots", tmp_path / "p"), "plots need matplotlib")
    assert not (tmp_path / "p").exists()


def test_analyze_rows_add_up():
    from compressor import analyze

    rows = analyze.analyze(tiny_model("qwen2"), "welore", ratio=0.3, device="cpu")
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    assert after == pytest.approx(0.7 * before, rel=0.05)
    for r in rows:
        assert (r["rank"] is None) == (r["params_after"] == r["params_before"])
        if r["rank"] is not None:
            assert r["rank"] <= r["break_even_rank"] and 0 < r["kept_energy"] < 1
    text = analyze.summary(rows)
    assert f"{before:,} -> {after:,}" in text

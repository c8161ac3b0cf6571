import json
import math

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from compressor.errors import CompressorError
from compressor.eval import lmeval, runner
from compressor.eval import perplexity as ppl_eval
from compressor.eval import tasks as eval_tasks


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, llama):
    path = tmp_path_factory.mktemp("eval") / "tiny"
    llama.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _reference_ppl(model, tok, text, seq_len, n):
    ids = tok(text, add_special_tokens=False).input_ids[: n * seq_len]
    total = 0.0
    with torch.no_grad():
        for w in range(n):
            x = torch.tensor(ids[w * seq_len : (w + 1) * seq_len]).unsqueeze(0)
            logits = model(input_ids=x).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
    return math.exp(total / (n * (seq_len - 1)))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_a_direct_computation(llama, batch_size):
    tok = byte_tokenizer()
    text = ppl_eval._text_for("code")[:20_000]
    res = ppl_eval.perplexity(llama, tok, text, seq_len=32, limit=5, batch_size=batch_size)
    assert res["windows"] == 5 and res["seq_len"] == 32 and res["tokens"] == 5 * 31
    assert res["ppl"] == pytest.approx(_reference_ppl(llama, tok, text, 32, 5), rel=1e-5)


def test_window_is_capped_at_the_context(llama):
    res = ppl_eval.perplexity(llama, byte_tokenizer(), ppl_eval._text_for("code"), seq_len=10_000, limit=1)
    assert res["seq_len"] == llama.config.max_position_embeddings


def test_prefix_tokenisation_equals_the_full_text():
    tok = byte_tokenizer()
    for name in ("wikitext2", "code"):
        text = ppl_eval._text_for(name)[:200_000]
        full = tok(text, add_special_tokens=False).input_ids
        prefix = ppl_eval._token_ids(tok, text, 3000)
        assert prefix.numel() == 3000 and prefix.tolist() == full[:3000]


def test_wikitext_rows_are_joined_with_blank_lines():
    text = ppl_eval._text_for("wikitext2")
    assert "\r" not in text and " = Robert Boulter = \n\n" in text


@pytest.mark.parametrize(
    "tasks, fragment",
    [
        ([], "no tasks given"),
        (["code_ppl", "code_ppl"], "given twice"),
        (["code_pl"], "did you mean 'code_ppl'"),
    ],
)
def test_bad_task_lists(monkeypatch, tasks, fragment):
    monkeypatch.setattr(lmeval, "available", lambda: False)
    with pytest.raises(CompressorError, match=fragment):
        eval_tasks.check_tasks(tasks)


def test_other_tasks_go_to_lm_eval(monkeypatch, llama):
    calls = []

    def fake(model, tokenizer, tasks, **kw):
        calls.append((tasks, kw))
        return {t: {"acc": 0.5, "n_samples": 3} for t in tasks}

    monkeypatch.setattr(lmeval, "available", lambda: True)
    monkeypatch.setattr(lmeval, "run_lmeval", fake)
    res = eval_tasks.run_tasks(llama, byte_tokenizer(), ["code_ppl", "arc_easy", "hellaswag"], seq_len=32, limit=2, max_new_tokens=7)
    assert list(res) == ["code_ppl", "arc_easy", "hellaswag"]
    assert res["arc_easy"]["acc"] == 0.5 and res["arc_easy"]["harness"] == "lm-eval"
    (tasks, kw), = calls
    assert tasks == ["arc_easy", "hellaswag"]
    assert kw["limit"] == 2 and kw["gen_kwargs"] == {"max_gen_toks": 7}


def test_humaneval_sampling_reports_pass_at_k(monkeypatch):
    from eval.test_humaneval import tiny_llama_long_context

    res = eval_tasks.run_tasks(
        tiny_llama_long_context(), byte_tokenizer(), ["humaneval"], limit=2, max_new_tokens=6,
        samples_per_task=3, temperature=0.8, pass_k=[1, 3], batch_size=3,
    )["humaneval"]
    assert set(k for k in res if k.startswith("pass@")) == {"pass@1", "pass@3"}
    assert res["n_samples"] == 3 and res["generation"]["do_sample"] is True
    assert all(len(t["completions"]) == 3 for t in res["per_task"].values())
    with pytest.raises(CompressorError, match="temperature"):
        eval_tasks.run_tasks(None, None, ["humaneval"], samples_per_task=2, temperature=0.0)


def test_evaluate_model_on_a_folder(saved):
    res = runner.evaluate_model(str(saved), ["code_ppl"], seq_len=32, limit=2, device="cpu", batch_size=2)
    info = res["model_info"]
    assert info["parameters"] == sum(p.numel() for p in tiny_model("llama").parameters())
    assert info["disk_bytes"] == (saved / "model.safetensors").stat().st_size
    assert info["compression"] is None and info["model_type"] == "llama"
    assert res["settings"]["batch_size"] == 2 and res["tasks"]["code_ppl"]["windows"] == 2
    assert res["tasks"]["code_ppl"]["seconds"] >= 0 and res["versions"]["torch"] == torch.__version__
    json.dumps(res)  # the results file must serialise as is


def test_unknown_task_fails_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(lmeval, "available", lambda: False)
    with pytest.raises(CompressorError, match="unknown task 'nope'"):
        runner.evaluate_model(str(tmp_path / "no-such-model"), ["nope"])


def test_evaluate_loaded_matches_evaluate_model(saved, llama):
    from_disk = runner.evaluate_model(str(saved), ["code_ppl"], seq_len=32, limit=2, device="cpu")
    in_memory = runner.evaluate_loaded(llama, byte_tokenizer(), ["code_ppl"], seq_len=32, limit=2, name=str(saved))
    assert in_memory["tasks"]["code_ppl"]["ppl"] == pytest.approx(from_disk["tasks"]["code_ppl"]["ppl"], rel=1e-6)
    assert in_memory["model_info"] == from_disk["model_info"]
    unnamed = runner.evaluate_loaded(llama, byte_tokenizer(), ["code_ppl"], seq_len=32, limit=1)
    assert unnamed["model_info"]["disk_bytes"] is None


def test_per_window_losses_add_up_to_the_perplexity(llama):
    """Each window's summed NLL, as a direct computation gives it; together they are the perplexity."""
    tok = byte_tokenizer()
    text = ppl_eval._text_for("code")[:20_000]
    res = ppl_eval.perplexity(llama, tok, text, seq_len=32, limit=5, batch_size=2, per_window=True)
    ids = tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        for w, got in enumerate(res["window_nll"]):
            x = torch.tensor(ids[w * 32 : (w + 1) * 32]).unsqueeze(0)
            expected = torch.nn.functional.cross_entropy(llama(input_ids=x).logits[0, :-1].double(), x[0, 1:], reduction="sum").item()
            assert got == pytest.approx(expected, rel=1e-5)
    assert len(res["window_nll"]) == 5
    assert res["ppl"] == pytest.approx(math.exp(sum(res["window_nll"]) / res["tokens"]), rel=1e-12)
    assert "window_nll" not in ppl_eval.perplexity(llama, tok, text, seq_len=32, limit=2)


def test_a_misspelt_option_is_an_error_not_ignored():
    with pytest.raises(CompressorError, match="no evaluation task takes an option 'sampels_per_task'"):
        eval_tasks.run_tasks(None, None, ["code_ppl"], sampels_per_task=2)


def test_every_builtin_task_is_registered_with_its_options():
    from compressor.eval.base import TASKS

    assert set(eval_tasks.BUILTIN_TASKS) == set(TASKS) == {"wikitext2_ppl", "code_ppl", "humaneval"}
    assert TASKS["code_ppl"].options({"seq_len": 64, "limit": 2, "samples_per_task": 3}).seq_len == 64  # others' options are left alone
    with pytest.raises(CompressorError, match="--seq-len must be at least 2"):
        TASKS["wikitext2_ppl"].options({"seq_len": 1})

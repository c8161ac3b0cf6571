import math
import signal
import time

import pytest
import torch
from conftest import _ATTN, byte_tokenizer, interrupt_child, start_child
from transformers import AutoModelForCausalLM, LlamaConfig

from compressor.errors import CompressorError
from compressor.eval import humaneval
from compressor.eval.humaneval import STOP_SEQUENCES, build_program, pass_at_k, truncate


def tiny_llama_long_context(seed: int = 0):
    # conftest's tiny llama has 256 positions; HumanEval prompts are longer in bytes.
    torch.manual_seed(seed)
    config = LlamaConfig(**{**_ATTN, "max_position_embeddings": 4096}, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config).eval()


# --- pass@k -----------------------------------------------------------------------------------


def test_pass_at_k_known_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    # k == n: 1 if anything passed, else 0.
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 1, 5) == 1.0
    assert pass_at_k(5, 5, 5) == 1.0
    # c > n - k: every draw of k contains a pass.
    assert pass_at_k(10, 8, 3) == 1.0


@pytest.mark.parametrize("n,c,k", [(10, 3, 2), (20, 5, 10), (200, 37, 1), (200, 37, 10), (200, 37, 100), (7, 0, 3)])
def test_pass_at_k_matches_binomial_formula(n, c, k):
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, 1, 6), (5, 1, 0), (0, 0, 1), (5, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# --- program construction and truncation ------------------------------------------------------


def test_truncate_at_earliest_stop():
    body = "    return x + 1\n"
    assert truncate(body) == body
    assert truncate(body + "\ndef other():\n    pass\n") == body
    assert truncate(body + "\n\n\nif __name__ == '__main__':\n    main()") == body + "\n\n"
    assert truncate(body + "\nprint(f(1))\n# comment\nclass A: pass") == body
    assert truncate(body + "\n# tests\ndef g(): pass") == body
    assert truncate("") == ""
    # Indented lines are the function's own and are kept.
    nested = "    if x:\n        print(x)\n    # note\n    return x\n"
    assert truncate(nested) == nested
    assert truncate("abc\nclass X", stop_sequences=["\nclass"]) == "abc"
    assert set(STOP_SEQUENCES) >= {"\nclass", "\ndef", "\n#", "\nif", "\nprint"}


def test_build_program_layout():
    problem = humaneval.problems(1)[0]
    program = build_program(problem, problem["canonical_solution"])
    assert program.startswith(problem["prompt"] + problem["canonical_solution"])
    assert problem["test"] in program
    assert program.rstrip().endswith(f"check({problem['entry_point']})")


def test_problems_limit():
    assert len(humaneval.problems()) == 164
    assert [p["task_id"] for p in humaneval.problems(3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(CompressorError):
        humaneval.problems(0)


# --- the harness on known solutions -----------------------------------------------------------


def test_canonical_solutions_all_pass():
    # All 164 on two workers: about 10 s on two CPU cores.
    start = time.time()
    report = humaneval.self_check(workers=2, broken=False, progress=False)
    assert report["canonical"] == {"passed": 164, "total": 164, "unexpected_failures": {}}
    assert report["ok"]
    assert time.time() - start < 120


def test_broken_solutions_fail():
    report = humaneval.self_check(limit=12, workers=2, progress=False)
    assert report["ok"], report
    assert report["canonical"]["passed"] == 12
    for name in humaneval.BROKEN_BODIES:
        assert report[name] == {"failed": 12, "total": 12, "unexpected_passes": []}


def test_score_counts_samples_per_problem():
    items = humaneval.problems(2)
    good = [p["canonical_solution"] for p in items]
    completions = [
        [good[0], "    return None\n", good[0]],
        ["    raise ValueError\n", "    return None\n", "    return None\n"],
    ]
    result = humaneval.score(items, completions, k=(1, 2, 3), workers=2, progress=False)
    assert result["per_task"]["HumanEval/0"]["passed"] == 2
    assert result["per_task"]["HumanEval/1"]["passed"] == 0
    assert result["per_task"]["HumanEval/0"]["statuses"] == ["passed", "failed", "passed"]
    assert result["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["pass@2"] == pytest.approx((1.0 + 0) / 2)
    assert result["pass@3"] == pytest.approx(0.5)
    assert result["n_problems"] == 2 and result["n_samples"] == 3
    with pytest.raises(CompressorError):
        humaneval.score(items, completions, k=(4,), progress=False)


# --- generation with a tiny model --------------------------------------------------------------


def test_stopping_criteria_per_row():
    tok = byte_tokenizer()
    prompt = tok("def f():\n").input_ids
    rows = [prompt + tok("    return 1\ndef").input_ids, prompt + tok("    return 1\n    x").input_ids]
    width = max(map(len, rows))
    rows = [r + [0] * (width - len(r)) for r in rows]
    stop = humaneval._stopping_criteria(tok, len(prompt), STOP_SEQUENCES)[0]
    done = stop(torch.tensor(rows), None)
    assert done.tolist() == [True, False]


def test_tiny_model_evaluation_structure():
    model, tok = tiny_llama_long_context(), byte_tokenizer()
    result = humaneval.evaluate_humaneval(model, tok, limit=2, max_new_tokens=16, progress=False)
    assert result["pass@1"] == 0.0
    assert result["n_problems"] == 2 and result["n_samples"] == 1
    assert list(result["per_task"]) == ["HumanEval/0", "HumanEval/1"]
    for task in result["per_task"].values():
        assert task["n"] == 1 and task["passed"] == 0
        assert len(task["completions"]) == 1 and isinstance(task["completions"][0], str)
        assert task["statuses"][0] in ("failed", "timeout", "error")
        # A byte is a token: 16 new tokens give at most 16 bytes of text.
        assert len(task["completions"][0].encode("utf-8", errors="replace")) <= 16 * 3
    assert result["generation"]["do_sample"] is False
    assert result["generation"]["max_new_tokens"] == 16


def test_generate_batches_and_samples_consistently():
    model, tok = tiny_llama_long_context(), byte_tokenizer()
    items = humaneval.problems(3)
    one = humaneval.generate(model, tok, items, max_new_tokens=8, batch_size=1, progress=False)
    many = humaneval.generate(model, tok, items, max_new_tokens=8, batch_size=3, progress=False)
    assert one == many  # left padding with an attention mask does not change greedy output
    repeated = humaneval.generate(model, tok, items[:1], max_new_tokens=8, n=3, progress=False)
    assert repeated == [one[0] * 3]  # greedy n > 1 repeats the single greedy sample
    sampled = humaneval.generate(model, tok, items[:2], max_new_tokens=8, n=2, do_sample=True, temperature=1.0, batch_size=4, progress=False)
    assert len(sampled) == 2 and all(len(s) == 2 for s in sampled)


def test_generation_progress_reaches_the_log_off_a_terminal(caplog):
    """Generation is the long step (minutes to an hour): under a log (pytest's stderr is no
    terminal) it reports through the compressor.progress logger, not a silent tqdm bar."""
    model, tok = tiny_llama_long_context(), byte_tokenizer()
    with caplog.at_level("INFO", logger="compressor.progress"):
        humaneval.generate(model, tok, humaneval.problems(2), max_new_tokens=4, batch_size=1)
    assert any("humaneval generate: 2/2 sample" in r.getMessage() for r in caplog.records), caplog.text


def test_prompt_longer_than_the_context_gives_empty_completion():
    from conftest import tiny_model

    model, tok = tiny_model("llama"), byte_tokenizer()  # 256 positions
    long_problem = max(humaneval.problems(), key=lambda p: len(p["prompt"]))
    assert humaneval.generate(model, tok, [long_problem], max_new_tokens=8, progress=False) == [[""]]


def test_k_larger_than_n_is_an_error():
    with pytest.raises(CompressorError):
        humaneval.evaluate_humaneval(None, None, limit=1, k=(1, 10), n=1)


# --- interrupting an evaluation -----------------------------------------------------------------


def test_ctrl_c_cancels_the_evaluation_at_once():
    # Ctrl-C while two workers run programs that would sleep for a minute and four more wait: the
    # evaluation must stop within moments, kill the programs and leave no sandbox folders. It runs
    # in a child process with its own TMPDIR, so the folders counted are only its own.
    body = (
        "items = humaneval.problems(6)\n"
        "slow = '    import time\\n    time.sleep(60)\\n'\n"
        "humaneval.score(items, [[slow]] * len(items), workers=2, timeout=60, progress=False)\n"
    )
    proc, tmpdir = start_child("humaneval-sigint-", "humaneval", body)
    code, _, stderr = interrupt_child(proc, tmpdir, signal.SIGINT)
    assert code != 0 and "KeyboardInterrupt" in stderr, stderr

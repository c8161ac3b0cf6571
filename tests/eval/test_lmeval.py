import json
import os

import pytest
from conftest import byte_tokenizer, tiny_model

from compressor.errors import CompressorError
from compressor.eval import lmeval

needs_lm_eval = pytest.mark.skipif(not lmeval.available(), reason='lm-eval not installed (pip install -e ".[eval]")')


def eos_byte_tokenizer():
    # lm-eval needs an EOS (or BOS) token; the NUL byte never occurs in the test texts.
    tok = byte_tokenizer()
    tok.eos_token = "Ā"  # the byte-level character of byte 0x00
    return tok


MC_YAML = """\
task: tiny_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture
def mc_task(tmp_path):
    rows = [
        {"question": "1 + 1 =", "choices": [" 2", " 3"], "label": 0},
        {"question": "2 + 2 =", "choices": [" 5", " 4"], "label": 1},
        {"question": "3 + 3 =", "choices": [" 6", " 9"], "label": 0},
        {"question": "The sky is", "choices": [" green", " blue"], "label": 1},
    ]
    data = tmp_path / "tiny_arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_arith.yaml").write_text(MC_YAML.format(data=json.dumps(str(data))))
    return folder


def test_missing_lm_eval_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(lmeval, "lm_eval_version", lambda: None)
    with pytest.raises(CompressorError, match=r"pip install -e \"\.\[eval\]\""):
        lmeval.run_lmeval(None, None, ["humaneval_local"])


def test_offline_restores_environment(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with lmeval.offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ


def test_task_folder_contents(tmp_path):
    folder = lmeval.task_folder(tmp_path / "t")
    text = (folder / "humaneval_local.yaml").read_text()
    assert "dataset_path: json" in text and "humaneval.jsonl.gz" in text
    assert "humaneval_local_utils.pass_at_1" in text
    assert (folder / "humaneval_local_utils.py").is_file()


@needs_lm_eval
def test_loglikelihood_task_with_local_data(mc_task):
    result = lmeval.run_lmeval(tiny_model("llama"), eos_byte_tokenizer(), ["tiny_arith"], include_path=mc_task, batch_size=2)
    row = result["tiny_arith"]
    assert 0.0 <= row["acc"] <= 1.0
    assert row["n_samples"] == 4
    assert "acc_stderr" in row
    assert row["lm_eval_version"] == lmeval.lm_eval_version()


@needs_lm_eval
def test_unknown_task_is_a_clear_error(mc_task):
    with pytest.raises(CompressorError, match="unknown lm-eval task 'tiny_arithm'.*tiny_arith"):
        lmeval.run_lmeval(tiny_model("llama"), eos_byte_tokenizer(), ["tiny_arithm"], include_path=mc_task)


@needs_lm_eval
def test_tokenizer_without_eos_is_a_clear_error():
    with pytest.raises(CompressorError, match="neither a BOS nor an EOS"):
        lmeval.run_lmeval(tiny_model("llama"), byte_tokenizer(), ["humaneval_local"])


@needs_lm_eval
def test_humaneval_local_with_tiny_model():
    from eval.test_humaneval import tiny_llama_long_context

    result = lmeval.run_lmeval(
        tiny_llama_long_context(), eos_byte_tokenizer(), ["humaneval_local"], limit=2,
        gen_kwargs={"max_gen_toks": 16}, progress=False,
    )
    assert result["humaneval_local"]["pass@1"] == 0.0
    assert result["humaneval_local"]["n_samples"] == 2


@needs_lm_eval
@pytest.mark.parametrize("body,expected", [("canonical", 1.0), ("    return None\n", 0.0)])
def test_humaneval_local_scores_in_our_sandbox(tmp_path, body, expected):
    """A scripted LM that answers with known solutions: the task's metric must score them right."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from compressor.eval import humaneval

    by_prompt = {p["prompt"]: p["canonical_solution"] for p in humaneval.problems()}

    class Scripted(LM):
        def generate_until(self, requests, disable_tqdm=False):
            return [by_prompt[r.args[0]] if body == "canonical" else body for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    manager = TaskManager(include_path=str(lmeval.task_folder(tmp_path / "tasks")), include_defaults=False)
    with lmeval.offline():
        results = lm_eval.simple_evaluate(
            model=Scripted(), tasks=["humaneval_local"], task_manager=manager, limit=6,
            confirm_run_unsafe_code=True, log_samples=False,
        )
    assert results["results"]["humaneval_local"]["pass@1,none"] == expected

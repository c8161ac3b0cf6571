"""Bridge to EleutherAI's lm-evaluation-harness (optional extra: pip install -e ".[eval]").

`run_lmeval` evaluates an in-memory model with lm-eval's HFLM wrapper and `simple_evaluate`, offline
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set for the call): lm-eval's own tasks work when their
datasets are already in the local HF cache. It also provides a task of ours, `humaneval_local`:
HumanEval from compressor's shipped data (`dataset_path: json`), greedy generation with the
Codex stop sequences, scored pass@1 by `compressor.eval.sandbox` (not HF `evaluate`'s code_eval).

The task folder is written at run time (`task_folder()`), because its YAML must name the data
file by absolute path; pass that folder to lm-eval's own CLI as `--include_path` to use the task
outside compressor.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from compressor.datasets import DATA_DIR
from compressor.errors import CompressorError
from compressor.eval import humaneval, sandbox
from compressor.eval.base import Task
from compressor.eval.humaneval import STOP_SEQUENCES

MIN_VERSION = (0, 4, 10)
LOCAL_TASKS = ("humaneval_local",)
INSTALL_HINT = 'lm-eval is not installed; pip install -e ".[eval]" (or pip install "lm-eval>=0.4.10")'

# Settings the humaneval_local metric uses while run_lmeval runs (lm-eval calls the metric
# functions itself, so they cannot take arguments from us).
SANDBOX_SETTINGS = {"workers": 2, "timeout": 10.0, "progress": True}

_TASK_YAML = """\
# Written by compressor.eval.lmeval.task_folder(); HumanEval scored in compressor's sandbox.
task: humaneval_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
unsafe_code: true
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{entry_point}}}}"
generation_kwargs:
  until: {until}
  max_gen_toks: 512
  do_sample: false
repeats: 1
num_fewshot: 0
filter_list:
  - name: "none"
    filter:
      - function: "custom"
        filter_fn: !function humaneval_local_utils.keep_all
process_results: !function humaneval_local_utils.process_results
metric_list:
  - metric: pass@1
    aggregation: !function humaneval_local_utils.pass_at_1
    higher_is_better: true
metadata:
  version: 1.0
"""

_TASK_UTILS = """\
# Written by compressor.eval.lmeval.task_folder(): lm-eval loads `!function` targets from files beside
# the YAML, so these names point back into compressor.
from compressor.eval.lmeval import humaneval_keep_all as keep_all
from compressor.eval.lmeval import humaneval_pass_at_1 as pass_at_1
from compressor.eval.lmeval import humaneval_process_results as process_results
"""


# --- humaneval_local: the functions the task's YAML names -------------------------------------


def humaneval_keep_all(resps, docs):
    """Filter: keep every sample per document (lm-eval's default keeps only the first)."""
    return resps


def humaneval_process_results(doc: dict, results: list) -> dict:
    """Per document: carry the problem and its completions to the aggregation, which runs them."""
    completions = results[0]
    if isinstance(completions, str):
        completions = [completions]
    problem = {key: doc[key] for key in ("task_id", "prompt", "test", "entry_point")}
    return {"pass@1": {"problem": problem, "completions": list(completions)}}


def humaneval_pass_at_1(items: list[dict]) -> float:
    """Aggregation: run every completion in the sandbox at once (in parallel) and average pass@1."""
    if not items:
        return 0.0
    programs, spans = [], []
    for item in items:
        start = len(programs)
        programs += [humaneval.build_program(item["problem"], humaneval.truncate(c)) for c in item["completions"]]
        spans.append((start, len(programs)))
    outcomes = sandbox.run_many(
        programs,
        workers=SANDBOX_SETTINGS["workers"],
        timeout=SANDBOX_SETTINGS["timeout"],
        progress=SANDBOX_SETTINGS["progress"],
        desc="humaneval_local tests",
    )
    total = 0.0
    for a, b in spans:
        n, c = b - a, sum(o.passed for o in outcomes[a:b])
        total += humaneval.pass_at_k(n, c, 1)
    return total / len(items)


def task_folder(dest: str | Path | None = None) -> Path:
    """Write the `humaneval_local` task (YAML + the module its `!function`s name) into `dest`."""
    data_file = Path(DATA_DIR) / "humaneval.jsonl.gz"
    if not data_file.is_file():
        raise CompressorError(f"HumanEval file {data_file} is missing; reinstall compressor")
    folder = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="compressor-lmeval-tasks-"))
    folder.mkdir(parents=True, exist_ok=True)
    until = json.dumps(list(STOP_SEQUENCES))  # a JSON list is a valid YAML flow sequence
    (folder / "humaneval_local.yaml").write_text(_TASK_YAML.format(data_file=json.dumps(str(data_file.resolve())), until=until))
    (folder / "humaneval_local_utils.py").write_text(_TASK_UTILS)
    return folder


# --- the bridge --------------------------------------------------------------------------------


def lm_eval_version() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_lm_eval():
    version = lm_eval_version()
    if version is None:
        raise CompressorError(INSTALL_HINT)
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_VERSION:
        raise CompressorError(f"lm-eval {version} is too old; pip install \"lm-eval>=0.4.10\"")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise CompressorError(f"lm-eval {version} is installed but does not import ({e}); {INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_OFFLINE_ATTRS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"))


@contextmanager
def offline():
    """HF hub and datasets offline for the duration (env vars and the constants read at import)."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update({k: "1" for k in _OFFLINE_ENV})
    saved_attrs = []
    try:
        for modname, attr in _OFFLINE_ATTRS:
            try:
                module = __import__(modname, fromlist=[attr])
            except ImportError:
                continue
            if hasattr(module, attr):
                saved_attrs.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in reversed(saved_attrs):
            setattr(module, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _flatten(results: dict) -> dict:
    """lm-eval's {"results": {task: {"acc,none": x, ...}}} as {task: {"acc": x, ...}}."""
    out = {}
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else f"{metric}[{filt}]"] = value
        if task in n_samples:
            row["n_samples"] = n_samples[task].get("effective")
        elif "sample_len" in metrics:
            row["n_samples"] = metrics["sample_len"]
        out[task] = row
    return out


def _task_manager(TaskManager, paths: list[Path], tasks: list[str]):
    """Index only our folders when they hold every task (fast); else lm-eval's built-ins too (~10-30 s)."""
    folders = [str(p) for p in paths]
    for defaults in (False, True):
        manager = TaskManager(include_path=folders, include_defaults=defaults)
        known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
        unknown = [t for t in tasks if t not in known]
        if not unknown:
            return manager
    import difflib

    hints = {t: difflib.get_close_matches(t, sorted(known), n=3) for t in unknown}
    hint = "; ".join(f"'{t}'" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
    raise CompressorError(f"unknown lm-eval task {hint}; ours: {', '.join(LOCAL_TASKS)}")


def _check_tokenizer(tokenizer, hflm_kwargs: dict) -> None:
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None and "prefix_token_id" not in hflm_kwargs:
        raise CompressorError(
            "the tokenizer has neither a BOS nor an EOS token; lm-eval needs one (as the loglikelihood "
            "prefix and generation end); set tokenizer.eos_token or pass hflm_kwargs={'prefix_token_id': ...}"
        )


def _is_offline_data_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError", "ConnectionError", "HFValidationError"})


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def run_lmeval(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | float | None = None,
    batch_size: int = 1,
    device=None,
    *,
    num_fewshot: int | None = None,
    include_path: str | Path | list | None = None,
    allow_unsafe_code: bool | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
    gen_kwargs: dict | None = None,
    hflm_kwargs: dict | None = None,
    workers: int = 2,
    timeout: float = 10.0,
    seed: int = 1234,
    progress: bool = True,
    raw: bool = False,
) -> dict:
    """lm-eval `tasks` on an already-loaded model; returns {task: {metric: value, "n_samples": n}}.

    The model is evaluated where it is (`device` is informational: move the model first).
    `limit` caps documents per task (a float < 1 is a fraction). `include_path` adds folders of
    lm-eval task YAMLs. When every task is found in our folders (`humaneval_local`, `include_path`),
    lm-eval's ~10,000 built-in task files are not indexed (that takes 10-30 s). `allow_unsafe_code` (lm-eval's
    confirm_run_unsafe_code) defaults to True only when the tasks are ours, whose code runs in
    compressor's sandbox. `workers`/`timeout` are the sandbox's for humaneval_local.
    `raw=True` adds lm-eval's whole result dict under "_lm_eval" (configs, versions, samples).
    """
    if not tasks:
        raise CompressorError("no lm-eval tasks given")
    lm_eval, HFLM, TaskManager = _require_lm_eval()
    hflm_kwargs = dict(hflm_kwargs or {})
    _check_tokenizer(tokenizer, hflm_kwargs)
    if allow_unsafe_code is None:
        allow_unsafe_code = all(t in LOCAL_TASKS for t in tasks)

    # The task folder only has to outlive this call; a TemporaryDirectory keeps /tmp clean.
    scratch = tempfile.TemporaryDirectory(prefix="compressor-lmeval-tasks-")
    paths = [task_folder(scratch.name)]
    if include_path is not None:
        paths += [Path(p) for p in (include_path if isinstance(include_path, (list, tuple)) else [include_path])]
    SANDBOX_SETTINGS.update(workers=workers, timeout=timeout, progress=progress)
    try:
        with offline():
            manager = _task_manager(TaskManager, paths, tasks)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **hflm_kwargs)
            try:
                results = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=list(tasks),
                    num_fewshot=num_fewshot,
                    limit=limit,
                    task_manager=manager,
                    log_samples=log_samples,
                    bootstrap_iters=bootstrap_iters,
                    gen_kwargs=gen_kwargs,
                    confirm_run_unsafe_code=allow_unsafe_code,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                )
            except CompressorError:
                raise
            except Exception as e:
                if _is_offline_data_error(e):
                    raise CompressorError(
                        f"an lm-eval task's dataset is not in the local Hugging Face cache and compressor "
                        f"evaluates offline ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                        f"fetch it once with network access (python -c \"import datasets; datasets.load_dataset(...)\") "
                        f"or use a local task such as humaneval_local"
                    ) from None
                if "unsafe" in str(e) and not allow_unsafe_code:
                    raise CompressorError(f"{e}; pass allow_unsafe_code=True to run it") from None
                raise
    finally:
        SANDBOX_SETTINGS.update(workers=2, timeout=10.0, progress=True)
        scratch.cleanup()
    if results is None:  # non-zero ranks in distributed runs
        return {}
    out = _flatten(results)
    for row in out.values():
        row["lm_eval_version"] = lm_eval_version()
    if raw:
        out["_lm_eval"] = results
    return out


def available() -> bool:
    """Whether lm-eval is installed (without importing it)."""
    return lm_eval_version() is not None


__all__ = ["run_lmeval", "task_folder", "offline", "available", "LOCAL_TASKS", "lm_eval_version"]


@dataclass
class LmEvalOptions:
    """Every task name the registry does not hold goes to lm-eval. limit: documents per task.
    include_path: folders of extra task YAML. num_fewshot: lm-eval's. max_new_tokens: generation
    tasks' max_gen_toks. workers / timeout / seed: for code tasks scored in the sandbox."""

    limit: int | float | None = None
    batch_size: int = 1
    include_path: str | Path | None = None
    num_fewshot: int | None = None
    max_new_tokens: int | None = None
    workers: int = 2
    timeout: float = 10.0
    seed: int = 0


class LmEvalTask(Task):
    """Not registered: it takes every name the registry does not hold."""

    name = "lm-eval"
    Options = LmEvalOptions


def run_with(model, tokenizer, tasks: list[str], o: LmEvalOptions) -> dict:
    """run_lmeval with the options object; one harness call runs every lm-eval task."""
    gen_kwargs = {"max_gen_toks": o.max_new_tokens} if o.max_new_tokens is not None else None
    return run_lmeval(model, tokenizer, tasks, limit=o.limit, batch_size=o.batch_size, include_path=o.include_path, num_fewshot=o.num_fewshot,
                      gen_kwargs=gen_kwargs, workers=o.workers, timeout=o.timeout, seed=o.seed)

"""Runs named tasks on a model in memory, each with its own options (compressor/eval/base.py).

Built-in tasks: `wikitext2_ppl`, `code_ppl` (perplexity.py), `humaneval` (humaneval.py, its
programs executed in sandbox/); any other name is handed to lm-eval (lmeval.py), which must be
installed and must find the task's data offline. A new task is a Task subclass with `@register`
in a module imported here.
"""

from __future__ import annotations

import difflib
import time

from compressor.errors import CompressorError
from compressor.eval import humaneval, lmeval, perplexity
from compressor.eval.base import TASKS, check_options

# The modules above register their tasks on import; these names are what the CLI lists.
PPL_TASKS = tuple(name for name, task in TASKS.items() if isinstance(task, perplexity._Perplexity))
HUMANEVAL_TASKS = tuple(name for name, task in TASKS.items() if isinstance(task, humaneval.HumanEval))
BUILTIN_TASKS = (*PPL_TASKS, *HUMANEVAL_TASKS, *(name for name in TASKS if name not in PPL_TASKS + HUMANEVAL_TASKS))


def check_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """Split `tasks` into ours and lm-eval's; fail early (before any model loads) on what cannot run."""
    if not tasks:
        raise CompressorError(f"no tasks given; use some of {', '.join(BUILTIN_TASKS)} or an lm-eval task name")
    dupes = sorted({t for t in tasks if tasks.count(t) > 1})
    if dupes:
        raise CompressorError(f"task {dupes[0]!r} given twice; list each task once")
    ours = [t for t in tasks if t in TASKS]
    others = [t for t in tasks if t not in TASKS]
    if others and not lmeval.available():
        close = difflib.get_close_matches(others[0], BUILTIN_TASKS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise CompressorError(
            f"unknown task '{others[0]}': {hint}built-in tasks are {', '.join(BUILTIN_TASKS)}; "
            f"other names go to lm-eval, which is not installed (pip install -e \".[eval]\")"
        )
    return ours, others


def run_tasks(model, tokenizer, tasks: list[str], seq_len: int = 2048, limit: int | None = None, device="cpu", **options) -> dict:
    """Evaluate an in-memory model on `tasks`; returns {task: metrics (each with "seconds")}.

    `limit` caps perplexity windows, HumanEval problems and lm-eval documents; `seq_len` is the
    perplexity window. `options` go to the tasks that take them (PerplexityOptions,
    HumanEvalOptions, LmEvalOptions); a name that no task takes is an error.
    """
    ours, others = check_tasks(tasks)
    given = {"seq_len": seq_len, "limit": limit, **options}
    check_options([*TASKS.values(), lmeval.LmEvalTask()], options)
    results = {}
    for name in ours:
        task = TASKS[name]
        settings = task.options(given)  # validated before the task runs
        start = time.time()
        res = task.run(model, tokenizer, device, settings)
        res["seconds"] = round(time.time() - start, 3)
        results[name] = res
    if others:
        start = time.time()
        found = lmeval.run_with(model, tokenizer, others, lmeval.LmEvalTask().options(given))
        seconds = round(time.time() - start, 3)
        for name, row in found.items():
            # One harness call runs every lm-eval task; its time is shared, not split.
            results[name] = {**row, "seconds": seconds, "harness": "lm-eval"}
    return results

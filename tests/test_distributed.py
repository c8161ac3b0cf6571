"""Data-parallel compression (compressor/distributed/, docs/guides/distributed.md): 2 gloo ranks on CPU
write what one process writes, and a rank that dies takes the whole run down with one error line.

Each 2-rank run starts three Pythons (the --nproc launcher and two ranks), ~15 s on 2 cores; the
one-process references run in this process. Both sides use one thread per process, so the only
difference left is the distributed one (which windows each rank runs, the order of the float64
sums), not the thread count's effect on BLAS/LAPACK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compressor import distributed
from compressor.api import compress
from compressor.distributed import Executor, executor

ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rank_entry.py")  # the CLI, plus a fault hook

CALIBRATION = "calibration: {dataset: code, samples: 8, seq_len: 32, batch_size: 2}\n"  # 4 batches: 2 per rank
RECIPES = {
    "whiten": "stages: [{method: whiten, ratio: 0.2}]\n",
    # the shipped gptq4 with the group size the tiny model's 64/96-wide layers allow
    "gptq4": "stages: [{method: gptq, bits: 4, group_size: 32, sym: true, act_order: true, damp: 0.01}]\n",
}
EVAL = ("--eval", "code_ppl", "--eval-limit", "3", "--eval-seq-len", "32")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tiny_model("llama").save_pretrained(root / "llama")
    byte_tokenizer().save_pretrained(root / "llama")
    for name, stages in RECIPES.items():
        (root / f"{name}.yaml").write_text(f"name: {name}-test\n{CALIBRATION}{stages}")
    return root


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ranks(*args, launcher=("-m", "compressor"), env=None, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, *launcher, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def tensors(out):
    return load_file(out / "model.safetensors")


def effective(t: dict) -> dict:
    """Per linear, the weight it computes with: up @ down for a factorised one (SVD factors are
    only defined up to the sign of each singular pair, which LAPACK picks from the last bits)."""
    found = {}
    for key, value in t.items():
        if key.endswith(".up.weight"):
            stem = key[: -len(".up.weight")]
            found[stem] = value.double() @ t[f"{stem}.down.weight"].double()
        elif not key.endswith(".down.weight"):
            found[key] = value
    return found


def codes(qweight: torch.Tensor) -> torch.Tensor:
    return torch.stack([(qweight >> (4 * i)) & 15 for i in range(8)])


def report(out):
    return json.loads((out / "compression_report.json").read_text())


def test_whiten_and_perplexity_match_one_process(src, tmp_path, one_thread):
    ref = compress(str(src / "llama"), str(src / "whiten.yaml"), tmp_path / "one", device="cpu",
                   eval_tasks=["code_ppl"], eval_limit=3, eval_seq_len=32).out
    out = tmp_path / "two"
    proc = ranks("compress", src / "llama", "-r", src / "whiten.yaml", "-o", out, "--device", "cpu", "--nproc", "2", *EVAL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("compressed ") and proc.stdout.count("compressed ") == 1, proc.stdout  # rank 0's summary, once
    one, two = effective(tensors(ref)), effective(tensors(out))
    assert one.keys() == two.keys()
    for key in one:
        # The Grams are the same float64 sums added in another order (the last bits differ, if
        # at all); the whitening's Cholesky and SVD magnify that by the Gram's condition number,
        # and float32 storage rounds it (observed: <= 4e-8 of the matrix's largest entry). 1e-5
        # leaves a wide margin and still catches a wrong share (one rank's Gram alone: ~1e-1).
        scale = one[key].double().abs().max().clamp_min(1e-30)
        assert float((one[key].double() - two[key].double()).abs().max() / scale) <= 1e-5, key
    # Untouched tensors (embeddings, norms) are bit-identical.
    raw1, raw2 = tensors(ref), tensors(out)
    for key in raw1:
        if not key.endswith(("up.weight", "down.weight")):
            assert torch.equal(raw1[key], raw2[key]), key
    r1, r2 = report(ref), report(out)
    assert r2["distributed"] == {"world_size": 2, "backend": "gloo", "split": "calibration windows", "layers_repaired_from_rank_0": 0}
    assert "distributed" not in r1
    assert r1["per_module"] == r2["per_module"] and r1["calibration"] == r2["calibration"]
    # Perplexity: rank 0 scores window 0, rank 1 windows 1-2; the per-window sums are gathered and
    # added as one process adds them, so the dense model's is identical.
    before1, before2 = r1["eval"]["before"]["code_ppl"], r2["eval"]["before"]["code_ppl"]
    assert before1 == {**before2, "seconds": before1["seconds"]}
    assert r2["eval"]["after"]["code_ppl"]["ppl"] == pytest.approx(r1["eval"]["after"]["code_ppl"]["ppl"], rel=1e-5)


def test_gptq_matches_one_process(src, tmp_path, one_thread):
    ref = compress(str(src / "llama"), str(src / "gptq4.yaml"), tmp_path / "one", device="cpu").out
    out = tmp_path / "two"
    proc = ranks("compress", src / "llama", "-r", src / "gptq4.yaml", "-o", out, "--device", "cpu", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    one, two = tensors(ref), tensors(out)
    assert one.keys() == two.keys()
    flipped = total = 0
    for key in one:
        a, b = one[key], two[key]
        if key.endswith(".qweight"):
            # GPTQ rounds each weight after the updates of the columns before it; a Gram that
            # differs in its last bits can move a weight across a rounding boundary only when it
            # sits within those bits of it: a rare tie. Allowed: 0.1 % of the codes (observed: 0).
            flipped += int((codes(a) != codes(b)).sum())
            total += codes(a).numel()
        elif key.endswith(".scales"):
            assert torch.allclose(a.float(), b.float(), rtol=2**-10, atol=0), key  # one float16 ulp
        else:
            assert torch.equal(a, b), key  # g_idx (act_order's column order), qzeros, norms, embeddings
    assert flipped <= 1e-3 * total, f"{flipped} of {total} codes differ"
    assert json.loads((ref / "config.json").read_text())["quantization_config"] == json.loads((out / "config.json").read_text())["quantization_config"]


def test_streamed_run_over_ranks_matches_one_streamed_process(src, tmp_path, one_thread):
    """--stream --nproc 2: the ranks share the calibration windows, each reads every layer from
    the shards, and rank 0 alone writes the streamed folder; it holds what one process streams."""
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(src / "llama")
    model.save_pretrained(sharded, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(sharded)
    ref = compress(str(sharded), str(src / "gptq4.yaml"), tmp_path / "one", device="cpu", stream=True).out
    out = tmp_path / "two"
    proc = ranks("compress", sharded, "-r", src / "gptq4.yaml", "-o", out, "--device", "cpu", "--stream", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("compressed ") == 1, proc.stdout
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    one = {k: v for f in sorted(ref.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    two = {k: v for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    assert one.keys() == two.keys()
    flipped = total = 0
    for key in one:
        if key.endswith(".qweight"):  # as in test_gptq_matches_one_process: rare rounding ties only
            flipped += int((codes(one[key]) != codes(two[key])).sum())
            total += codes(one[key]).numel()
        elif key.endswith(".scales"):
            assert torch.allclose(one[key].float(), two[key].float(), rtol=2**-10, atol=0), key
        else:
            assert torch.equal(one[key], two[key]), key
    assert flipped <= 1e-3 * total
    assert report(out)["streamed"] and report(out)["distributed"]["world_size"] == 2
    assert json.loads((ref / "config.json").read_text())["quantization_config"] == json.loads((out / "config.json").read_text())["quantization_config"]


def test_data_free_recipe_splits_layers_under_torchrun(src, tmp_path, one_thread):
    """welore: spectra and factors per layer on the rank that owns it (0: layer 0, 1: layer 1),
    gathered; the same arithmetic on the same weights, so the same bits."""
    ref = compress(str(src / "llama"), "welore", tmp_path / "one", ratio=0.3, device="cpu").out
    out = tmp_path / "two"
    proc = ranks("--nproc-per-node", "2", "-m", "compressor", "compress", src / "llama", "-r", "welore", "--ratio", "0.3", "-o", out, "--device", "cpu",
                 launcher=("-m", "torch.distributed.run"))
    assert proc.returncode == 0, proc.stderr
    one, two = tensors(ref), tensors(out)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    config1, config2 = (json.loads((o / "config.json").read_text()) for o in (ref, out))
    assert list(config1["compression"]["modules"].items()) == list(config2["compression"]["modules"].items())
    assert report(out)["distributed"]["split"] == "layers"
    assert report(ref)["per_module"] == report(out)["per_module"]


def test_a_dying_rank_fails_the_run_with_one_line(src, tmp_path):
    out = tmp_path / "out"
    proc = ranks("compress", src / "llama", "-r", src / "whiten.yaml", "-o", out, "--device", "cpu", "--nproc", "2",
                 launcher=(ENTRY,), env={"COMPRESSOR_TEST_FAULT": "1:1:exit"}, cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 of 2: exited with code 7 and no message; all ranks stopped"], proc.stderr
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary folder


def test_shares_are_contiguous_and_whole_batches():
    # 10 windows in batches of 4 over 2 ranks: batches [0-3], [4-7] and [8-9] -> ranks take 1 and 2 batches
    assert [distributed.span(10, 2, r, 4) for r in range(2)] == [(0, 4), (4, 10)]
    assert [distributed.span(8, 2, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    # fewer batches than ranks: split window by window
    assert [distributed.span(3, 2, r, 8) for r in range(2)] == [(0, 1), (1, 3)]
    with pytest.raises(distributed.CompressorError, match="cannot be split over 4 ranks"):
        distributed.span(3, 4, 0, 8)
    assert distributed.span(1, 2, 0, allow_empty=True) == (0, 0)
    # every window exactly once, in order
    for n, parts, align in [(64, 3, 8), (7, 7, 1), (100, 4, 16)]:
        spans = [distributed.span(n, parts, r, align) for r in range(parts)]
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_nproc_reruns_the_same_command():
    import click

    from compressor.cli import cli, command_words

    parent = click.Context(cli, info_name="compressor")
    parent.params = {"verbose": True}
    args = ["m", "-r", "whiten", "-o", "out dir", "--ratio", "0.25", "--overwrite", "--nproc", "2"]
    ctx = cli.commands["compress"].make_context("compress", args, parent=parent)
    words = command_words(ctx)
    assert words[:2] == ["-v", "compress"] and "--nproc" not in words and words[-2:] == ["--", "m"]
    assert words[words.index("--out") + 1] == "out dir" and words[words.index("--ratio") + 1] == "0.25" and "--overwrite" in words
    assert "--stream" not in words  # false flags stay out
    # what the ranks parse is what was asked
    again = cli.commands["compress"].make_context("compress", words[2:], parent=parent)
    assert {k: v for k, v in again.params.items() if k != "nproc"} == {k: v for k, v in ctx.params.items() if k != "nproc"}


def test_one_process_executor_is_the_plain_call():
    """Outside a process group of several ranks, runs get the one-process executor: fn is called
    once, on every item in order, and the other operations hand back what they were given."""
    assert type(executor()) is Executor
    calls = []

    def fn(batch):
        calls.append(list(batch))
        return [x * 10 for x in batch]

    ex = Executor()
    assert ex.map_by_cost(fn, [3, 1, 2], cost=lambda x: x, group=lambda x: x % 2) == [30, 10, 20]
    assert calls == [[3, 1, 2]]
    sums, windows = {"a": torch.ones(2)}, torch.zeros(4, 3)
    assert ex.sum_tensors(sums) is sums and ex.sum_counts({"t": 3}) == {"t": 3}
    assert ex.shard(windows, 2) is windows and ex.merge_layers({"x": 1}) == {"x": 1}


def test_work_is_packed_largest_first_onto_the_least_loaded_rank():
    from compressor.distributed.executor import pack_by_cost

    # costs 9, 7, 6, 5, 3 over 2 ranks: 9 -> 0, 7 -> 1, 6 -> 1 (13), 5 -> 0 (14), 3 -> 1 (16)
    costs = {"a": 9, "b": 7, "c": 6, "d": 5, "e": 3}
    assert pack_by_cost(costs, {k: i for i, k in enumerate(costs)}, 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    # equal costs: the group whose first item comes first goes first, to the lowest rank
    assert pack_by_cost({"x": 1, "y": 1}, {"x": 5, "y": 2}, 2) == {"y": 0, "x": 1}
    assert set(pack_by_cost({"x": 4, "y": 1}, {"x": 0, "y": 1}, 3).values()) == {0, 1}  # one rank left idle


@pytest.fixture
def fault_hook():
    """Installs policy.fault_hook for one test (production leaves it None), recording the layers."""
    from compressor.distributed import policy

    seen: list[int] = []
    assert policy.fault_hook is None
    policy.fault_hook = seen.append
    yield seen
    policy.fault_hook = None


def test_layer_turns_call_the_fault_hook(fault_hook):
    # one process: every layer is this rank's turn, split or not, and the hook sees each layer
    assert [distributed.layer_turn(i, split) for i, split in [(0, False), (1, True), (2, True)]] == [True, True, True]
    assert fault_hook == [0, 1, 2]

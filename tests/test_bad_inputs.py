"""Every failure a user can cause or meet (issue 19, docs/reference/errors.md): one `error: ...` line on stderr,
exit 2 for bad input, 3 for an environment fault, 1 for an internal error, 143 for SIGTERM, no
traceback, and nothing left in the output's folder (no output, no `.OUT.tmp-*` copy, no partial file).

The matrix runs `compressor.cli.main` in this process (fast); what needs a real process (signals,
dropped privileges, a file-size limit) runs in a subprocess. Each row fails if its check is removed:
the fragment it asserts comes from that check.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from safetensors.torch import load_file, save_file

from compressor import api
from compressor.calibration import driver
from compressor.calibration.windows import calibration_windows
from compressor.cli import main
from compressor.errors import CompressorError

NOISE = ("compressor.progress:", "Loading weights", "Writing model shards")  # progress lines, not messages


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_weights(folder: Path, edit) -> Path:
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """The tiny models and broken inputs every row draws from, built once."""
    from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, FalconConfig, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("zoo")
    z = {"llama": root / "llama"}
    tiny_model("llama").save_pretrained(z["llama"])  # max_position_embeddings 256
    byte_tokenizer().save_pretrained(z["llama"])
    weights = (z["llama"] / "model.safetensors").read_bytes()

    z["truncated"] = _copy(z["llama"], root / "truncated")
    (z["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    z["garbage"] = _copy(z["llama"], root / "garbage")
    (z["garbage"] / "model.safetensors").write_bytes(b"not a safetensors file at all " * 20)
    z["missing"] = _edit_weights(_copy(z["llama"], root / "missing"), lambda w: w.pop("model.layers.0.self_attn.q_proj.weight"))
    z["nohead"] = _edit_weights(_copy(z["llama"], root / "nohead"), lambda w: w.pop("lm_head.weight"))
    z["nan"] = _edit_weights(_copy(z["llama"], root / "nan"), lambda w: w["model.embed_tokens.weight"].__setitem__((3, 5), float("nan")))
    z["noweights"] = _copy(z["llama"], root / "noweights")
    (z["noweights"] / "model.safetensors").unlink()

    z["t5"] = root / "t5"
    T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, vocab_size=256)).save_pretrained(z["t5"])
    byte_tokenizer().save_pretrained(z["t5"])
    z["bert"] = root / "bert"
    BertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=256)).save_pretrained(z["bert"])
    byte_tokenizer().save_pretrained(z["bert"])
    z["falcon"] = root / "falcon"
    AutoModelForCausalLM.from_config(FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=256)).save_pretrained(z["falcon"])
    byte_tokenizer().save_pretrained(z["falcon"])

    z["gguf"] = root / "short.gguf"
    z["gguf"].write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic and a version, then nothing: 8 bytes
    recipes = {
        "gram_int8": "calibration: {gram_dtype: int8}\nstages: [{method: whiten}]\n",
        "gram_foo": "calibration: {gram_dtype: foo}\nstages: [{method: whiten}]\n",
        "rank0": "stages: [{method: svd, rank: 0}]\n",
        "rank_neg": "stages: [{method: svd, rank: -3}]\n",
        "batch0": "calibration: {batch_size: 0}\nstages: [{method: whiten}]\n",
        "samples0": "calibration: {samples: 0}\nstages: [{method: whiten}]\n",
        "seq_neg": "calibration: {seq_len: -5}\nstages: [{method: whiten}]\n",
        "damp_neg": "stages: [{method: whiten, damp: -0.1}]\n",
        "bits5": "stages: [{method: gptq, bits: 5}]\n",
        "eora_rank0": "stages: [{method: gptq, group_size: 32}, {method: eora, rank: 0}]\n",
        "seq512": "calibration: {samples: 2, seq_len: 512}\nstages: [{method: whiten}]\n",
    }
    for name, text in recipes.items():
        z[name] = root / f"{name}.yaml"
        z[name].write_text(text)
    z["latin1"] = root / "latin1.yaml"
    z["latin1"].write_bytes("# r\xe9glage\nstages: [{method: svd}]\n".encode("latin-1"))
    return z


def _cli(capfd, *args) -> tuple[int, str, str]:
    """`compressor ARGS` in this process: (exit code, stdout, stderr)."""
    capfd.readouterr()
    argv, sys.argv = sys.argv, ["compressor", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    out, err = capfd.readouterr()
    return code, out, err


def _one_error(code: int, err: str, expected: int, fragment: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.lstrip("\r").startswith(NOISE) and "%|" not in line]
    assert code == expected, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    return lines[0]


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# (id, command line with {placeholders}, exit code, fragment of the one error line)
ROWS = [
    # silently wrong output before: now refused
    ("missing-tensor", "compress {missing} -r svd -o {out}", 2, "lacks 1 tensor(s) the LlamaForCausalLM needs: model.layers.0.self_attn.q_proj.weight"),
    ("random-head", "eval {nohead} --tasks code_ppl --seq-len 16 --limit 1 -o {res}", 2, "needs (the LM head): lm_head.weight"),
    ("bert-eval", "eval {bert} --tasks code_ppl --seq-len 16 --limit 1 -o {res}", 2, "the checkpoint is a BertForMaskedLM, not a causal LM"),
    ("gram-int8", "compress {llama} -r {gram_int8} -o {out}", 2, "calibration: key 'gram_dtype' must be one of float64, float32; got 'int8'"),
    ("rank-0", "compress {llama} -r {rank0} -o {out}", 2, "stages[0] (svd): key 'rank' must be an integer >= 1 or null, got 0"),
    ("nan-embedding", "compress {nan} -r svd -o {out}", 2, "tensor model.embed_tokens.weight contains NaN or Inf values"),
    ("samples-0", "compress {llama} -r whiten -o {out} --samples 0", 2, "'--samples': 0 is not in the range x>=1"),
    ("seq-len-0", "compress {llama} -r whiten -o {out} --seq-len 0", 2, "'--seq-len': 0 is not in the range x>=2"),
    ("seq-len-beyond-context", "compress {llama} -r whiten -o {out} --samples 2 --seq-len 512", 2, "--seq-len 512 is beyond the model's context of 256 tokens"),
    ("recipe-seq-len-beyond-context", "compress {llama} -r {seq512} -o {out}", 2, "calibration.seq_len 512 is beyond the model's context of 256 tokens"),
    # tracebacks before: now one line
    ("truncated-safetensors", "compress {truncated} -r svd -o {out}", 2, "model.safetensors is truncated or not a safetensors file"),
    ("truncated-safetensors-stream", "compress {truncated} -r svd -o {out} --stream", 2, "model.safetensors is truncated or not a safetensors file"),
    ("garbage-safetensors-eval", "eval {garbage} --tasks code_ppl --seq-len 16 --limit 1", 2, "model.safetensors is truncated or not a safetensors file"),
    ("gguf-8-bytes", "compress {gguf} -r svd -o {out}", 2, "is only 8 bytes, a truncated GGUF file"),
    ("recipe-not-utf8", "compress {llama} -r {latin1} -o {out}", 2, "is not UTF-8 text"),
    ("gram-foo", "compress {llama} -r {gram_foo} -o {out}", 2, "key 'gram_dtype' must be one of float64, float32; got 'foo'"),
    ("rank-negative", "compress {llama} -r {rank_neg} -o {out}", 2, "key 'rank' must be an integer >= 1 or null, got -3"),
    ("batch-size-0", "compress {llama} -r {batch0} -o {out}", 2, "calibration: key 'batch_size' must be an integer >= 1, got 0"),
    ("recipe-samples-0", "compress {llama} -r {samples0} -o {out}", 2, "calibration: key 'samples' must be an integer >= 1, got 0"),
    ("recipe-seq-len-negative", "compress {llama} -r {seq_neg} -o {out}", 2, "calibration: key 'seq_len' must be an integer >= 2, got -5"),
    ("damp-negative", "compress {llama} -r {damp_neg} -o {out}", 2, "stages[0] (whiten): key 'damp' must be a number >= 0, got -0.1"),
    ("gptq-bits-5", "compress {llama} -r {bits5} -o {out}", 2, "stages[0] (gptq): key 'bits' must be one of 2, 3, 4, 8; got 5"),
    ("eora-rank-0", "compress {llama} -r {eora_rank0} -o {out}", 2, "stages[1] (eora): key 'rank' must be an integer >= 1, got 0"),
    ("samples-negative", "compress {llama} -r whiten -o {out} --samples -1", 2, "'--samples': -1 is not in the range x>=1"),
    ("seq-len-negative", "compress {llama} -r whiten -o {out} --seq-len -1", 2, "'--seq-len': -1 is not in the range x>=2"),
    ("ratio-out-of-range", "compress {llama} -r svd -o {out} --ratio 1.5", 2, "'--ratio': 1.5 is not in the range 0<x<1"),
    ("eval-batch-size-0", "eval {llama} --tasks code_ppl --batch-size 0", 2, "'--batch-size': 0 is not in the range x>=1"),
    ("out-is-a-file", "compress {llama} -r svd -o {file} --overwrite", 2, "is a file, not a folder; --overwrite replaces only an output folder"),
    ("out-under-a-file", "compress {llama} -r svd -o {file}/out", 2, "is a file, not a folder; choose another path"),
    ("out-is-the-source", "compress {llama} -r svd -o {llama} --overwrite", 2, "is the source model folder; writing there would replace the source"),
    ("out-holds-the-source", "compress {llama} -r svd -o {zoo} --overwrite", 2, "is the source model or holds it"),
    ("eval-t5", "eval {t5} --tasks code_ppl --seq-len 16 --limit 1", 2, "T5 is an encoder-decoder model; compressor handles causal (decoder-only) LMs"),
    ("eval-no-weights", "eval {noweights} --tasks code_ppl --seq-len 16 --limit 1", 2, "has a config.json but no weights"),
    ("eval-out-is-a-folder", "eval {llama} --tasks code_ppl --seq-len 16 --limit 1 -o {tmp}", 2, "is a folder; give a file name"),
    ("eval-out-under-a-file", "eval {llama} --tasks code_ppl --seq-len 16 --limit 1 -o {file}/r.json", 2, "is a file, not a folder"),
    ("analyze-nan", "analyze {nan} -r svd --summary-only", 2, "tensor model.embed_tokens.weight contains NaN or Inf values"),
    ("analyze-plots-is-a-file", "analyze {llama} -r svd --plots {file}", 2, "is a file"),
    ("stream-missing-key", "compress {missing} -r svd -o {out} --stream", 2, "lacks 1 tensor(s) the LlamaForCausalLM needs"),
    ("stream-unsupported", "compress {falcon} -r svd -o {out} --stream", 2, "unsupported architecture 'falcon'"),
    ("stream-t5", "compress {t5} -r svd -o {out} --stream", 2, "T5 is an encoder-decoder model"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(row, zoo, tmp_path, capfd):
    _, command, code, fragment = row
    work = tmp_path / "work"
    work.mkdir()
    (work / "a-file").write_text("mine")
    names = {**{k: str(v) for k, v in zoo.items()}, "zoo": str(zoo["llama"].parent), "out": str(work / "out"),
             "res": str(work / "results.json"), "file": str(work / "a-file"), "tmp": str(work)}
    zoo_before, work_before = _listing(zoo["llama"].parent), _listing(work)
    code_, _, err = _cli(capfd, *[part.format(**names) for part in command.split()])
    _one_error(code_, err, code, fragment)
    assert _listing(work) == work_before, "something was left behind"
    assert _listing(zoo["llama"].parent) == zoo_before, "the inputs' folder changed"
    assert (work / "a-file").read_text() == "mine"


def test_zero_is_never_the_recipes_value(zoo, tmp_path, tokenizer):
    """The API behind the CLI: 0 samples or a 0/1-token window is refused, not replaced by the
    recipe's value (the old `samples or cfg.samples`)."""
    for kw, fragment in ((dict(samples=0), "--samples must be an integer >= 1, got 0"), (dict(seq_len=0), "--seq-len must be an integer >= 2, got 0"),
                         (dict(seq_len=1), "--seq-len must be an integer >= 2, got 1")):
        with pytest.raises(CompressorError, match=fragment):
            api.compress(str(zoo["llama"]), "whiten", tmp_path / "out", device="cpu", **kw)
        with pytest.raises(CompressorError, match=fragment):
            calibration_windows(api.recipes.load("whiten"), tokenizer, None, **kw)
    assert not (tmp_path / "out").exists()


def test_nan_of_an_in_memory_model_is_not_written(tmp_path, tokenizer):
    """The last line of defence, for models that never went through the loader: every tensor
    written (embedding and head included) is checked, and the error names it."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(CompressorError, match="tensor lm_head.weight holds NaN or Inf values"):
        api.compress(model, "svd", tmp_path / "out", tokenizer=tokenizer, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_save(zoo, tmp_path, capfd, monkeypatch):
    """ENOSPC half-way through writing: an environment fault (exit 3), the temporary copy removed."""
    from transformers import PreTrainedModel

    def full(self, folder, *a, **k):
        (Path(folder) / "model.safetensors").write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    code, _, err = _cli(capfd, "compress", zoo["llama"], "-r", "svd", "-o", tmp_path / "out", "--device", "cpu")
    _one_error(code, err, 3, f"writing {tmp_path / 'out'}: No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_internal_error_is_one_line_and_v_shows_the_traceback(zoo, tmp_path, capfd, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(driver, "run", boom)
    args = ["compress", zoo["llama"], "-r", "svd", "-o", tmp_path / "out", "--device", "cpu"]
    code, _, err = _cli(capfd, *args)
    assert _one_error(code, err, 1, "") == "error: internal error: RuntimeError: boom (run with -v for the traceback)"
    code, _, err = _cli(capfd, "-v", *args)
    assert code == 1 and "Traceback" in err and err.rstrip().endswith("error: internal error: RuntimeError: boom")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_killed_runs_are_removed(zoo, tmp_path, capfd):
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-999999999-abcd"  # above any pid_max: its process is gone
    old_style = tmp_path / ".out.tmp-k2j3h4"
    live = tmp_path / ".out.tmp-1-efgh"  # pid 1 is alive: another run's, kept
    for d in (dead, old_style, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"torn")
    code, _, err = _cli(capfd, "compress", zoo["llama"], "-r", "svd", "-o", out, "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]


def _killed_stream(src: Path, out: Path) -> Path:
    """A --stream run killed after its first layer: the partial folder --resume continues."""

    class Killed(Exception):
        pass

    def kill(i):
        raise Killed

    with pytest.raises(Killed):
        api.compress(src, "svd", out, device="cpu", stream=True, after_layer=kill)
    partial = out.with_name(f".{out.name}.partial")
    assert json.loads((partial / "progress.json").read_text())["done"] == 1
    return partial


def test_unfinished_stream_run(zoo, tmp_path, capfd):
    """A partial folder is named with both ways on; --overwrite clears it; a damaged progress file
    or shard is refused with --resume, and the partial folder stays for --overwrite."""
    out = tmp_path / "out"
    partial = _killed_stream(zoo["llama"], out)
    base = ["compress", zoo["llama"], "-r", "svd", "-o", out, "--device", "cpu"]
    code, _, err = _cli(capfd, *base, "--stream")
    _one_error(code, err, 2, "holds an unfinished run of this -o; pass --resume to continue it, or --overwrite to discard it")

    progress = (partial / "progress.json").read_text()
    (partial / "progress.json").write_text(progress[: len(progress) // 2])
    code, _, err = _cli(capfd, *base, "--resume")
    _one_error(code, err, 2, "progress.json is damaged (JSONDecodeError")
    (partial / "progress.json").write_text(progress)
    shard = partial / "model-00001-of-00003.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:100])
    code, _, err = _cli(capfd, *base, "--resume")
    _one_error(code, err, 2, "model-00001-of-00003.safetensors, a finished layer of the unfinished run, is corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name]

    code, _, err = _cli(capfd, *base, "--stream", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- real processes

_RUN_ALL = textwrap.dedent(
    """
    import io, json, sys
    from compressor.cli import main

    results = []
    for args in json.loads(sys.argv[1]):
        sys.argv, sys.stderr = ["compressor", *args], io.StringIO()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        results.append([code, sys.stderr.getvalue()])
    sys.__stdout__.write(json.dumps(results))
    """
)


def _drop_dac():
    """Child side: give up root's power to ignore file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_all(commands: list[list[str]], preexec=None, cwd=None) -> list[tuple[int, str]]:
    done = subprocess.run([sys.executable, "-c", _RUN_ALL, json.dumps([[str(a) for a in c] for c in commands])],
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return [tuple(r) for r in json.loads(done.stdout)]


def test_unwritable_places_are_refused_before_any_work(zoo, tmp_path):
    """Permission denied is an environment fault (exit 3), found before the model loads."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    preexec = _drop_dac if os.geteuid() == 0 else None
    probe = subprocess.run([sys.executable, "-c", f"import os; print(os.access({str(locked)!r}, os.W_OK))"], capture_output=True, text=True, preexec_fn=preexec)
    if probe.stdout.strip() != "False":
        pytest.skip("cannot make a folder unwritable here (root without CAP_SETPCAP)")
    results = _run_all([
        ["compress", zoo["llama"], "-r", "svd", "-o", locked / "out", "--device", "cpu"],
        ["compress", zoo["llama"], "-r", "svd", "-o", locked / "deeper" / "out", "--device", "cpu"],
        ["analyze", zoo["llama"], "-r", "svd", "--plots", locked / "plots"],
        ["eval", zoo["llama"], "--tasks", "code_ppl", "--seq-len", "16", "--limit", "1", "-o", locked / "r.json"],
    ], preexec=preexec)
    for (code, err), fragment in zip(results, ["cannot write -o", "cannot write -o", "cannot write --plots", "cannot write -o"]):
        line = _one_error(code, err, 3, fragment)
        assert "permission denied" in line and str(locked) in line
    assert list(locked.iterdir()) == []


def test_file_size_limit_during_save(zoo, tmp_path):
    """A real write failure from safetensors (EFBIG under a file-size ulimit, as ENOSPC on a full
    disk): exit 3 and the temporary copy is gone."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    ((code, err),) = _run_all([["compress", zoo["llama"], "-r", "svd", "-o", tmp_path / "out", "--device", "cpu"]], preexec=limit)
    _one_error(code, err, 3, f"writing {tmp_path / 'out'}: File too large")
    assert list(tmp_path.iterdir()) == []


_SLOW = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    marker = Path(sys.argv[1])

    def stall():
        marker.touch()
        time.sleep(120)

    if sys.argv[2] == "save":  # stall inside save_pretrained, after the weights are written
        from transformers import PreTrainedModel
        original = PreTrainedModel.save_pretrained
        def slow(self, *a, **k):
            original(self, *a, **k)
            stall()
        PreTrainedModel.save_pretrained = slow
    else:  # stall after the first streamed layer is recorded
        from compressor.pipeline import sinks
        write = sinks._write_json_atomic
        def slow(obj, path):
            write(obj, path)
            if obj.get("done") == 1:
                stall()
        sinks._write_json_atomic = slow
    from compressor.cli import main
    sys.argv = ["compressor", *sys.argv[3:]]
    main()
    """
)


def _terminated(tmp_path: Path, where: str, args: list) -> tuple[int, str]:
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, str(marker), where, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    marker.unlink()
    return proc.returncode, err


def test_sigterm_during_save_cleans_up(zoo, tmp_path):
    out = tmp_path / "out"
    code, err = _terminated(tmp_path, "save", ["compress", zoo["llama"], "-r", "svd", "-o", out, "--device", "cpu"])
    _one_error(code, err, 143, "interrupted by SIGTERM; ")
    assert "was not written and its temporary copy was removed" in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_stream_says_how_to_resume(zoo, tmp_path, capfd):
    out = tmp_path / "out"
    code, err = _terminated(tmp_path, "stream", ["compress", zoo["llama"], "-r", "svd", "-o", out, "--device", "cpu", "--stream"])
    _one_error(code, err, 143, "keeps 1 of 2 finished layers: rerun with --resume to continue, or --overwrite to start over")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial"]  # what --resume continues
    code, _, err = _cli(capfd, "compress", zoo["llama"], "-r", "svd", "-o", out, "--device", "cpu", "--resume")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

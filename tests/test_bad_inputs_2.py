"""Reliability, round 2 (issue 30, docs/reference/errors.md "The rules"): each class of failure has a rule the
code enforces everywhere; each case of the issue is a row here, and each rule a test of its own
(a walk over every option, every recipe key, a seeded fuzz of every API loader).

Rows run `compressor.cli.main` in this process through the helpers of test_bad_inputs.py: one
`error:` line, the exit code, nothing left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
import types
import typing
from pathlib import Path

import click
import pytest
import torch
from conftest import REPO, byte_tokenizer, tiny_model
from test_bad_inputs import _cli, _copy, _killed_stream, _listing, _one_error

import compressor
from compressor import api, files, limits, methods, ownership
from compressor import recipe as recipes
from compressor.calibration.windows import calibration_windows
from compressor.errors import CompressorError
from compressor.recipe import CalibrationConfig


class NotATensor:
    """Pickled into a .bin: torch's safe loader refuses it."""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    root = tmp_path_factory.mktemp("zoo2")
    z = {"llama": root / "llama"}
    tiny_model("llama").save_pretrained(z["llama"])
    byte_tokenizer().save_pretrained(z["llama"])

    z["neox"] = root / "neox"  # stores its head as embed_out, which transformers maps onto lm_head
    torch.manual_seed(0)
    neox = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=256,
                         max_position_embeddings=128, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(neox).save_pretrained(z["neox"])
    byte_tokenizer().save_pretrained(z["neox"])

    z["small_vocab"] = root / "small_vocab"  # 128 embeddings, a byte tokenizer of 256 ids
    AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                 vocab_size=128, max_position_embeddings=128)).save_pretrained(z["small_vocab"])
    byte_tokenizer().save_pretrained(z["small_vocab"])

    z["gptq"] = _copy(z["llama"], root / "gptq")
    config = json.loads((z["gptq"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (z["gptq"] / "config.json").write_text(json.dumps(config))
    z["config_list"] = _copy(z["llama"], root / "config_list")
    (z["config_list"] / "config.json").write_text("[1, 2]")

    z["pickle"] = _copy(z["llama"], root / "pickle")
    (z["pickle"] / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": NotATensor()}, z["pickle"] / "pytorch_model.bin")

    laughs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    laughs += [f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    recipes = {
        "laughs": "\n".join(laughs) + "\nstages: [{method: svd, rank: *i}]\n",
        "duplicate": "stages: [{method: svd, rank: 4, rank: 8}]\n",
        "method_list": "stages: [{method: [svd]}]\n",
        "damp_huge": "stages: [{method: whiten, damp: 1.0e+308}]\n",
        "damp_1e308": "stages: [{method: whiten, damp: 1e308}]\n",  # YAML 1.1 reads 1e308 (no dot) as a string
        "eora_rank_huge": "calibration: {samples: 2, seq_len: 16}\nstages: [{method: gptq, bits: 8, group_size: 32}, {method: eora, rank: 100000}]\n",
        "whiten_small": "calibration: {samples: 32, seq_len: 64, batch_size: 8}\nstages: [{method: whiten, ratio: 0.3}]\n",
    }
    for name, text in recipes.items():
        z[name] = root / f"{name}.yaml"
        z[name].write_text(text)
    z["fifo"] = root / "pipe.txt"
    os.mkfifo(z["fifo"])
    z["fifo_recipe"] = root / "pipe.yaml"
    os.mkfifo(z["fifo_recipe"])
    z["short_text"] = root / "short.txt"
    z["short_text"].write_text("def f(x):\n    return x + 1\n" * 20)  # 560 bytes: 560 tokens of the byte tokenizer
    return z


def _names(zoo, work: Path) -> dict[str, str]:
    (work / "a-file").write_text("mine")
    os.symlink("/dev/null", work / "to-null")
    os.symlink(work / "nowhere", work / "dangling")
    os.mkfifo(work / "fifo.json")
    return {**{k: str(v) for k, v in zoo.items()}, "out": str(work / "out"), "res": str(work / "results.json"), "work": str(work),
            "long": str(work / ("a" * 242)), "to_null": str(work / "to-null"), "dangling": str(work / "dangling"), "fifo_out": str(work / "fifo.json")}


EVAL = "--tasks code_ppl --seq-len 16 --limit 1"
# (id, class, command line with {placeholders}, exit code, fragment of the one error line)
ROWS = [
    # 1. destroys something that is not ours
    ("eval-out-symlink-to-dev-null", 1, f"eval {{llama}} {EVAL} -o {{to_null}}", 2, "is a character device, not a regular file"),
    ("eval-out-fifo", 1, f"eval {{llama}} {EVAL} -o {{fifo_out}}", 2, "is a FIFO (named pipe), not a regular file"),
    ("compare-out-symlink-to-dev-null", 1, "compare {llama} {llama} --tasks code_ppl -o {to_null}", 2, "is a character device"),
    # 3. a small input costs unbounded memory or time
    ("recipe-billion-laughs", 3, "compress {llama} -r {laughs} -o {out}", 2, "its YAML aliases expand to more than 10000 values"),
    ("calib-fifo", 3, "compress {llama} -r whiten -o {out} --calib {fifo} --samples 2 --seq-len 16 --device cpu", 2, "is a FIFO (named pipe)"),
    ("recipe-fifo", 3, "compress {llama} -r {fifo_recipe} -o {out}", 2, "is a FIFO (named pipe), not a regular file"),
    ("samples-a-billion", 3, "compress {llama} -r whiten -o {out} --samples 1000000000", 2, "1000000000 is not in the range x<=1048576"),
    # 4. says nothing while doing something else
    ("recipe-duplicate-key", 4, "compress {llama} -r {duplicate} -o {out}", 2, "key 'rank' is given twice in one mapping"),
    ("ratio-without-a-ratio-stage", 4, "compress {llama} -r gptq8 -o {out} --ratio 0.3", 2, "no stage of this recipe (gptq) takes a ratio"),
    ("eora-rank-beyond-the-matrix", 4, "compress {llama} -r {eora_rank_huge} -o {out} --device cpu", 2, "eora rank 100000 is larger than"),
    # 5. bad input ending in a traceback or exit 1
    ("method-is-a-list", 5, "compress {llama} -r {method_list} -o {out}", 2, "key 'method' must be one method name"),
    ("config-json-is-a-list", 5, "compress {config_list} -r svd -o {out}", 2, "config.json holds a JSON list, not an object"),
    ("config-json-is-a-list-eval", 5, f"eval {{config_list}} {EVAL}", 2, "config.json holds a JSON list, not an object"),
    ("damp-1e308", 5, "compress {llama} -r {damp_1e308} -o {out}", 2, "stages[0] (whiten): key 'damp' must be float, got '1e308' (YAML reads 1e308 as text"),
    ("damp-1.0e+308", 5, "compress {llama} -r {damp_huge} -o {out}", 2, "key 'damp' must be a number <= 1000.0, got 1e+308"),
    ("tokenizer-beyond-the-vocabulary", 5, f"eval {{small_vocab}} {EVAL}", 2, "is beyond the model's 128 embeddings"),
    ("gptq-source", 5, "compress {gptq} -r svd -o {out}", 2, "is already quantised (gptq); start from its full-precision checkpoint"),
    ("gptq-source-eval", 5, f"eval {{gptq}} {EVAL}", 2, "is already quantised (gptq)"),
    ("pickle-bin", 5, "compress {pickle} -r svd -o {out} --device cpu", 2, "a pickle holding more than tensors"),
    ("out-dangling-symlink", 5, "compress {llama} -r svd -o {dangling}", 2, "which does not exist; remove the link"),
    ("eval-out-dangling-symlink", 5, f"eval {{llama}} {EVAL} -o {{dangling}}", 2, "which does not exist; remove the link"),
    ("out-name-242-bytes", 5, "compress {llama} -r svd -o {long}", 2, "its name is 242 bytes"),
    ("eval-out-name-242-bytes", 5, f"eval {{llama}} {EVAL} -o {{long}}", 2, "its name is 242 bytes"),
    ("out-under-proc", 5, "compress {llama} -r svd -o /proc/compressor-out", 2, "/proc does not take new files"),
    ("eval-out-under-proc", 5, f"eval {{llama}} {EVAL} -o /proc/r.json", 2, "/proc does not take new files"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(row, zoo, tmp_path, capfd):
    _, _, command, code, fragment = row
    work = tmp_path / "work"
    work.mkdir()
    names = _names(zoo, work)
    zoo_before, work_before = _listing(zoo["llama"].parent), _listing(work)
    code_, _, err = _cli(capfd, *[part.format(**names) for part in command.split()])
    _one_error(code_, err, code, fragment)
    assert _listing(work) == work_before, "something was left behind"
    assert _listing(zoo["llama"].parent) == zoo_before, "the inputs' folder changed"
    assert os.path.islink(work / "to-null") and os.path.realpath(work / "to-null") == "/dev/null"
    assert Path("/dev/null").is_char_device()


# ----------------------------------------------------------------------------- 1. not ours


def test_rule_only_regular_files_are_written(tmp_path):
    """The one atomic writer refuses anything but a regular file or a new name, follows a link to a
    regular file (writing its target, keeping the link) and refuses a dangling one."""
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/null", tmp_path / "null")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for name, fragment in (("fifo", "is a FIFO"), ("null", "is a character device"), ("dangling", "which does not exist")):
        with pytest.raises(CompressorError, match=fragment):
            files.write_json(tmp_path / name, {"a": 1})
    (tmp_path / "real.json").write_text("old")
    os.symlink(tmp_path / "real.json", tmp_path / "link.json")
    files.write_json(tmp_path / "link.json", {"a": 1})
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "real.json").read_text()) == {"a": 1}
    assert Path("/dev/null").is_char_device() and (tmp_path / "fifo").is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "fifo", "link.json", "null", "real.json"]


# ----------------------------------------------------------------------------- 3. bounded cost


def test_calibration_reads_only_what_the_windows_need(tmp_path, tokenizer, monkeypatch):
    """A 30 MB text for 2 windows of 16 tokens: the tokenizer sees a bounded prefix (1 MiB), not the file."""
    big = tmp_path / "big.txt"
    big.write_text("x = 1\n" * 5_000_000)
    seen = []
    real = type(tokenizer).__call__

    def counting(self, text, *a, **k):
        seen.append(len(text))
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    windows = calibration_windows(recipes.load("whiten"), tokenizer, str(big), samples=2, seq_len=16)
    assert windows.shape == (2, 16)
    assert sum(seen) <= limits.text_budget(2, 16) + 2 < 30_000_000 // 20


def test_samples_beyond_memory_are_refused_before_work(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 30)
    with pytest.raises(CompressorError, match=r"calibration with 1000000 windows of 128 tokens needs about .* more than the 1.0 GB available"):
        api.compress(str(zoo["llama"]), "whiten", tmp_path / "out", samples=1_000_000, seq_len=128, device="cpu")
    assert list(tmp_path.iterdir()) == []


def _numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if f.init and (int in kinds or float in kinds) and bool not in kinds:
            yield f.name, (float if float in kinds else int)


def test_rule_every_numeric_recipe_key_has_a_bound():
    """Every int or float key of every method's config and of calibration refuses a huge value."""
    configs = [CalibrationConfig, *{methods.get(n).Config for n in methods.names()}]
    walked = 0
    for cls in configs:
        for name, kind in _numeric_fields(cls):
            for huge in ((10**15,) if kind is int else (1e308, float("inf"), 10**15)):
                with pytest.raises(CompressorError, match=f"key '{name}' must be"):
                    cls(**{name: huge})
                walked += 1
    assert walked >= 20


def _numeric_options():
    from compressor.cli import cli

    for command in cli.commands.values():
        for param in command.params:
            if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
                yield command.name, param


def test_rule_every_numeric_option_has_a_bound(capfd, tmp_path):
    """Every number a command takes has an upper bound, and one past it is a usage error (exit 2)
    before any work."""
    required = {"compress": ["{llama}", "-r", "svd", "-o", str(tmp_path / "out")], "eval": ["{llama}"], "analyze": ["{llama}"],
                "compare": ["{llama}", "{llama}", "-o", str(tmp_path / "c.md")]}
    options = list(_numeric_options())
    assert len(options) >= 20
    for command, param in options:
        assert isinstance(param.type, click.types._NumberRangeBase) and param.type.max is not None, f"{command} {param.opts[0]} has no bound"
        above = param.type.max + 1 if isinstance(param.type, click.IntRange) else param.type.max * 2
        code, _, err = _cli(capfd, command, *[a.replace("{llama}", "no-such-model") for a in required[command]], param.opts[0], above)
        _one_error(code, err, 2, f"Invalid value for '{param.opts[0]}'")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 4. says what it does


def test_overlapping_windows_are_announced(zoo, tmp_path, capfd, caplog):
    """32 windows of 64 tokens from a 560-token file overlap: the run goes on, and says so in one
    warning (the CLI prints it on stderr as `compressor.calibration: ...`)."""
    with caplog.at_level("WARNING", logger="compressor.calibration"):
        code, _, err = _cli(capfd, "compress", zoo["llama"], "-r", zoo["whiten_small"], "-o", tmp_path / "out", "--device", "cpu",
                            "--calib", zoo["short_text"])
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if "windows overlap" in r.getMessage()]
    assert len(warned) == 1 and "fewer than the 2048 that 32 windows of 64 need" in warned[0], warned


def test_rule_duplicate_keys_but_not_merge_overrides():
    """A key written twice is refused with its line; a key a merge (`<<: *base`) brings and the
    mapping overrides is ordinary YAML and stays allowed; aliases within the cap load."""
    from compressor.recipe import parse

    with pytest.raises(CompressorError, match="line 4: key 'rank' is given twice"):
        parse("stages:\n  - method: svd\n    rank: 4\n    rank: 8\n")
    text = "base: &b {method: svd, rank: 4}\nstages:\n  - <<: *b\n    rank: 8\n  - *b\n"
    assert parse(text)["stages"] == [{"method": "svd", "rank": 8}, {"method": "svd", "rank": 4}]


# ----------------------------------------------------------------------------- 5. toolkit errors only


@pytest.fixture(scope="module")
def compressed(zoo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compressed") / "svd"
    api.compress(str(zoo["llama"]), "svd", out, device="cpu")
    return out


def test_output_paths_refused_up_front(zoo, tmp_path, capfd, monkeypatch):
    """`-o .` (or a folder holding the current one) and a mount point with --overwrite: refused
    before the run, not by a failing rename after it."""
    work = tmp_path / "work"
    (work / "deeper").mkdir(parents=True)
    monkeypatch.chdir(work / "deeper")
    for out, fragment in ((".", "is the current folder"), ("..", "is the current folder or holds it")):
        code, _, err = _cli(capfd, "compress", zoo["llama"], "-r", "svd", "-o", out, "--overwrite")
        _one_error(code, err, 2, fragment)
    mount = tmp_path / "mnt"
    mount.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.path.abspath(p) == str(mount) or real(p))
    code, _, err = _cli(capfd, "compress", zoo["llama"], "-r", "svd", "-o", mount, "--overwrite")
    _one_error(code, err, 2, "is a mount point, which --overwrite cannot replace")
    assert _listing(tmp_path) == {"work", "work/deeper", "mnt"}


_COMPRESSION_EDITS = [
    ("rank", -3), ("rank", "8"), ("rank", None), ("type", "tucker"), ("type", ["lowrank"]), ("in", 0), ("out", 1.5), ("bias", "no"),
    ("bits", 7), ("group_size", 0), ("cols", -1), ("quant", {"bits": 7, "group_size": 32}), ("adapter", {"rank": 0, "bits": 4, "group_size": 32}),
]


def _fuzzed_configs(config: dict, seed: int = 0, count: int = 24):
    """Named edits of the compression section (the issue's cases), then seeded random ones."""
    name = sorted(config["compression"]["modules"])[0]
    yield "modules-as-a-list", {**config, "compression": {**config["compression"], "modules": list(config["compression"]["modules"])}}
    elsewhere = {"model.nowhere.q_proj": config["compression"]["modules"][name]}
    yield "unknown-module-name", {**config, "compression": {**config["compression"], "modules": elsewhere}}
    yield "compression-a-string", {**config, "compression": "svd"}
    for key, value in _COMPRESSION_EDITS:
        edited = json.loads(json.dumps(config))
        edited["compression"]["modules"][name][key] = value
        yield f"{key}={value!r}", edited
    rng = random.Random(seed)
    junk = [None, -1, 0, 7, 2**40, 1e308, "x", [], {}, True, [1, 2]]
    for i in range(count):
        edited = json.loads(json.dumps(config))
        target = rng.choice([edited, edited["compression"], edited["compression"]["modules"][name]])
        key = rng.choice(sorted(target))
        target[key] = rng.choice(junk)
        yield f"random-{i}:{key}", edited


def test_rule_api_loaders_raise_only_toolkit_errors(compressed, tmp_path):
    """compressor.load and the eval loader on a seeded fuzz of config.json: a loaded model or a
    CompressorError, never a raw exception."""
    from compressor.eval.runner import load_any

    config = json.loads((compressed / "config.json").read_text())
    folder = _copy(compressed, tmp_path / "fuzzed")
    refused = 0
    for name, edited in _fuzzed_configs(config):
        (folder / "config.json").write_text(json.dumps(edited))
        for loader in (compressor.load, load_any):
            try:
                loader(str(folder))
            except CompressorError:
                refused += 1
            except Exception as exc:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{name}: {loader.__module__}.{loader.__name__} raised {type(exc).__name__}: {exc}")
    assert refused >= 2 * (3 + len(_COMPRESSION_EDITS))


def test_rule_compress_raises_only_toolkit_errors_on_a_fuzzed_config(zoo, tmp_path):
    """compressor.compress on a model folder whose config.json was edited at random (seeded): a
    result or a CompressorError, never a raw exception."""
    config = json.loads((zoo["llama"] / "config.json").read_text())
    folder = _copy(zoo["llama"], tmp_path / "fuzzed")
    rng = random.Random(1)
    junk = [None, -1, 0, 3, 2**40, 1e308, "x", [], {}, True]
    for i in range(8):
        edited = dict(config)
        key = rng.choice(sorted(k for k in config if k not in ("architectures", "transformers_version")))
        edited[key] = rng.choice(junk)
        (folder / "config.json").write_text(json.dumps(edited))
        try:
            compressor.compress(str(folder), "svd", device="cpu")
        except CompressorError:
            pass
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"random-{i}: {key}={edited[key]!r}: compress raised {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------- 6. valid input accepted


def test_gpt_neox_evaluates(zoo, capfd):
    """transformers maps GPT-NeoX's embed_out onto lm_head itself; the toolkit does not compress
    GPT-NeoX, so it defers to transformers' loading (whose report is still checked)."""
    code, out, err = _cli(capfd, "eval", zoo["neox"], *EVAL.split())
    assert code == 0, err
    assert out.startswith("code_ppl: ppl ")


# ----------------------------------------------------------------------------- 2. nothing mixed or lost


def test_resume_refuses_changed_source_weights(zoo, tmp_path, capfd):
    src = _copy(zoo["llama"], tmp_path / "src")
    out = tmp_path / "out"
    _killed_stream(src, out)
    from safetensors.torch import load_file, save_file

    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] *= 2  # same names, shapes and file size
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = _cli(capfd, "compress", src, "-r", "svd", "-o", out, "--device", "cpu", "--resume")
    _one_error(code, err, 2, "was started with other settings (source or its weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial", "src"]


_HOLD = textwrap.dedent(
    """
    import sys, time
    from compressor import ownership
    ownership.claim(sys.argv[1])
    print("held", flush=True)
    time.sleep(120)
    """
)


@contextlib.contextmanager
def _held(out: Path):
    """Another live process holding the lock of `out`."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_one_run_at_a_time_per_output(zoo, tmp_path, capfd):
    """A live run's lock refuses a second run into the same -o, and --stream --overwrite leaves the
    live run's .partial alone; the lock of a dead run is taken over."""
    out = tmp_path / "out"
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "progress.json").write_text("{}")
    with _held(out) as pid:
        for extra in ([], ["--stream", "--overwrite"]):
            code, _, err = _cli(capfd, "compress", zoo["llama"], "-r", "svd", "-o", out, "--device", "cpu", *extra)
            _one_error(code, err, 2, f"another run (pid {pid}) is writing -o {out} right now")
        assert (partial / "progress.json").read_text() == "{}"
    # The holder was killed: its lock file is still there, its lock is not.
    assert ownership.lock_path(out).exists()
    code, _, err = _cli(capfd, "compress", zoo["llama"], "-r", "svd", "-o", out, "--device", "cpu", "--stream", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_TERM_AT_RENAME = textwrap.dedent(
    """
    import contextlib, os, signal, sys
    from compressor import files
    held = files.signals_deferred

    @contextlib.contextmanager
    def term_inside():
        with held():
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the final rename
            yield

    files.signals_deferred = term_inside
    from compressor.cli import main
    sys.argv = ["compressor", *sys.argv[1:]]
    main()
    """
)


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
def test_sigterm_during_the_final_rename_tells_the_truth(zoo, tmp_path, stream):
    out = tmp_path / "out"
    args = ["compress", str(zoo["llama"]), "-r", "svd", "-o", str(out), "--device", "cpu", *(["--stream"] if stream else [])]
    done = subprocess.run([sys.executable, "-c", _TERM_AT_RENAME, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    _one_error(done.returncode, done.stderr, 143, f"{out} was written completely before the interruption")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert compressor.load(out) is not None

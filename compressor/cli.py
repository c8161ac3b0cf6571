"""`compressor` command line: parse, call the API, print. No logic of its own."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from compressor.errors import MAX_COUNT, CompressorError
from compressor.loading import DTYPES as STORED_DTYPES

# Upper bounds of the options (class 3 of docs/reference/errors.md): every number has one, so a typo costs a
# usage error before any work; what the model or machine bounds more tightly (--seq-len against the
# context, --samples against memory) is checked again before the model loads.
MAX_SEED = 2**32 - 1  # the generators seeded (torch, numpy, random) all take it
MAX_BATCH = 1 << 16
MAX_WORKERS = 1024
MAX_PROCESSES = 1024
MAX_TIMEOUT = 86400.0  # a day per test program
MAX_TEMPERATURE = 100.0
MAX_FEWSHOT = 1000
MAX_SAMPLES_PER_TASK = 10_000


class _Capped:
    """A click range with a lower and an upper bound whose message names the bound that was
    passed: the lower one as click words a range with no upper bound ("x>=1"), the upper one on
    its own ("x<=1048576")."""

    def convert(self, value, param, ctx):
        number = click.types._NumberParamTypeBase.convert(self, value, param, ctx)
        if number > self.max or (self.max_open and number == self.max):
            self.fail(f"{number} is not in the range x{'<' if self.max_open else '<='}{self.max}.", param, ctx)
        return super().convert(value, param, ctx)

    def _describe_range(self) -> str:
        return f"x{'>' if self.min_open else '>='}{self.min}"


class IntCap(_Capped, click.IntRange):
    pass


class FloatCap(_Capped, click.FloatRange):
    pass

DEVICES = click.Choice(["auto", "cpu", "cuda"])
DTYPES = click.Choice(list(STORED_DTYPES))
OUT_DTYPES = click.Choice(["auto", *STORED_DTYPES])


def _tasks(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compressor")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
def cli(verbose: bool) -> None:
    """Post-training compression of causal LMs (structured width reduction, SVD rank reduction,
    GPTQ, compensation adapters), export in standard formats, offline evaluation.

    Start with: compressor compress demo -r gptq8 -o out/demo --eval code_ppl (see `compressor recipes`)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    # Progress lines (off a terminal, where tqdm bars are off) show without -v.
    logging.getLogger("compressor.progress").setLevel(logging.INFO)


@cli.command()
@click.argument("model")
@click.option("-r", "--recipe", help="Shipped recipe name (see `compressor recipes`) or YAML path; with --target-size/--target-bits, 'target' by default.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist unless --overwrite).")
@click.option("--target-size", help="The output's weights at most this big: 700MB, 1.2GB, 900MiB, or a share of the dense model, 0.75x or 75%; "
              "each linear gets the GPTQ bits and adapter rank that lose least within it.")
@click.option("--target-bits", type=click.FloatRange(0, 32, min_open=True),
              help="Instead of --target-size: bits per decoder-linear weight, scales, zeros and adapters included (e.g. 3.5).")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Fraction of decoder-linear parameters to remove, in (0, 1); overrides the recipe.")
@click.option("--calib", help="Calibration data: shipped set name (code, python, ...) or a folder/.txt/.jsonl path.")
@click.option("--samples", type=IntCap(1, MAX_COUNT), help="Calibration windows (overrides the recipe).")
@click.option("--seq-len", type=IntCap(2, MAX_COUNT), help="Calibration window length in tokens (overrides the recipe).")
@click.option("--device", type=DEVICES, default="auto", show_default=True, help="Where decompositions run.")
@click.option("--dtype", type=OUT_DTYPES, default="auto", show_default=True,
              help="Precision of the output: auto keeps the source's (bfloat16 for a .gguf). Computation runs in float32/float64 regardless.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--eval", "eval_tasks", default="", help="Comma-separated perplexity tasks measured before and after, e.g. code_ppl.")
@click.option("--eval-limit", type=IntCap(1, MAX_COUNT), help="At most this many windows per evaluation task.")
@click.option("--eval-seq-len", type=IntCap(2, MAX_COUNT), default=2048, show_default=True,
              help="Evaluation window length (capped at the model's context).")
@click.option("--stream", is_flag=True, help="Read MODEL (a local safetensors folder) one layer at a time: for models larger than memory.")
@click.option("--resume", is_flag=True, help="Continue an interrupted --stream run from its last finished layer (same result, byte for byte).")
@click.option("--nproc", type=IntCap(1, MAX_PROCESSES),
              help="Calibrate data-parallel in N processes on this machine (docs/guides/distributed.md); not under torchrun.")
def compress(model, recipe, out, target_size, target_bits, ratio, calib, samples, seq_len, device, dtype, overwrite, eval_tasks, eval_limit,
             eval_seq_len, stream, resume, nproc):
    """Compress MODEL (a local folder, a .gguf file, a hub id, or 'demo') into OUT, with a recipe
    (-r) or within a size (--target-size / --target-bits)."""
    from compressor import summary
    from compressor.loading import resolve_model
    from compressor.recipe import choose

    # Everything that can be wrong with the arguments is found before the model loads.
    checked = choose(recipe, ratio, target_size, target_bits)
    resolve_model(model)
    from compressor import distributed

    if nproc is not None and _start_ranks(click.get_current_context(), nproc):
        return  # --nproc: the ranks ran this command; rank 0 printed the summary
    from compressor.api import compress as run

    result = run(
        model, checked, out, ratio=ratio, calib=calib, samples=samples, seq_len=seq_len, device=device, dtype=dtype,
        overwrite=overwrite, eval_tasks=_tasks(eval_tasks), eval_limit=eval_limit, eval_seq_len=eval_seq_len,
        stream=stream, resume=resume,
    )
    if not distributed.is_primary():
        return  # distributed: rank 0 wrote the output and prints the summary
    for line in summary.render(result.report, model, out, _tasks(eval_tasks) if result.report.get("eval") else []):
        click.echo(line)


def _start_ranks(ctx, nproc: int) -> bool:
    """`--nproc N`: run N ranks of this command and return True once all succeeded (a failure
    raises one line). False when there is nothing to start: N == 1, or this process is already a
    rank of a torchrun/--nproc launch of N."""
    from compressor.distributed import launch, state

    if nproc <= 1 and not state.launched():
        return False
    if state.launched():
        if state.env_world_size() != nproc:
            raise CompressorError(f"--nproc {nproc} under a launch of WORLD_SIZE={state.env_world_size()} processes; leave --nproc out under torchrun")
        return False
    launch.launch(command_words(ctx), nproc)
    return True


def command_words(ctx, drop: tuple[str, ...] = ("nproc",)) -> list[str]:
    """The click command behind `ctx` as command-line words (global -v, the command, its options,
    then `--` and its arguments), so each rank re-runs exactly what was asked."""
    words = ["-v"] if ctx.parent is not None and ctx.parent.params.get("verbose") else []
    words.append(ctx.info_name)
    arguments: list[str] = []
    for param in ctx.command.params:
        if param.name in drop or param.name not in ctx.params:
            continue
        value = ctx.params[param.name]
        if value is None:
            continue
        if isinstance(param, click.Argument):
            arguments.extend(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            continue
        name = max(param.opts, key=len)
        if getattr(param, "count", False):
            words.extend([name] * int(value))
        elif param.is_flag:
            if value:
                words.append(name)
            elif param.secondary_opts:
                words.append(max(param.secondary_opts, key=len))
        else:
            for v in value if param.multiple else [value]:
                words.append(name)
                words.extend(str(x) for x in (v if isinstance(v, tuple) else (v,)))
    return [*words, "--", *arguments] if arguments else words


def _ints(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in _tasks(value)]
    except ValueError:
        raise CompressorError(f"--pass-k takes comma-separated integers such as 1,10; got {value!r}") from None


def _eval_options(f):
    """The options `eval` and `compare` share (how each task is run)."""
    options = [
        click.option("--tasks", default="wikitext2_ppl,code_ppl", show_default=True,
                     help="Comma-separated: wikitext2_ppl, code_ppl, humaneval, or lm-eval task names."),
        click.option("--limit", type=IntCap(1, MAX_COUNT),
                      help="At most this many perplexity windows / HumanEval problems / lm-eval documents per task."),
        click.option("--seq-len", type=IntCap(2, MAX_COUNT), default=2048, show_default=True,
                     help="Perplexity window in tokens (capped at the model's context)."),
        click.option("--batch-size", type=IntCap(1, MAX_BATCH), default=1, show_default=True,
                     help="Windows per forward pass (perplexity), prompts per generate call (HumanEval), lm-eval batch."),
        click.option("--max-new-tokens", type=IntCap(1, MAX_COUNT),
                      help="Generation cap per sample [HumanEval default: 512; lm-eval: the task's own]."),
        click.option("--samples-per-task", type=IntCap(1, MAX_SAMPLES_PER_TASK), default=1, show_default=True,
                     help="HumanEval samples per problem; above 1 it samples (--temperature) and reports pass@k."),
        click.option("--temperature", type=FloatCap(0, MAX_TEMPERATURE), default=0.2, show_default=True,
                     help="HumanEval sampling temperature (with --samples-per-task > 1)."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
                     help="HumanEval nucleus sampling (with --samples-per-task > 1)."),
        click.option("--pass-k", help="HumanEval k values, e.g. 1,10 [default: 1, 10, 100 up to the samples per problem]."),
        click.option("--workers", type=IntCap(1, MAX_WORKERS), default=2, show_default=True, help="Sandboxed test programs run at once."),
        click.option("--timeout", type=FloatCap(0, MAX_TIMEOUT, min_open=True), default=10.0, show_default=True,
                      help="Seconds each test program may run."),
        click.option("--seed", type=IntCap(0, MAX_SEED), default=0, show_default=True, help="Sampling seed."),
        click.option("--include-path", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Folder of extra lm-eval task YAMLs."),
        click.option("--num-fewshot", type=IntCap(0, MAX_FEWSHOT), help="lm-eval few-shot examples (default: the task's own)."),
        click.option("--device", type=DEVICES, default="auto", show_default=True),
        click.option("--dtype", type=DTYPES, default="float32", show_default=True),
        click.option("--adapter/--no-adapter", default=True, show_default=True,
                     help="Apply the PEFT adapter a compressed folder carries (out/adapter); --no-adapter evaluates the base alone."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _run_options(kw: dict) -> dict:
    """Click's option values as `evaluate_model` keyword arguments."""
    for name in ("batch_size", "samples_per_task", "workers"):
        if kw[name] < 1:
            raise CompressorError(f"--{name.replace('_', '-')} must be at least 1, got {kw[name]}")
    if kw["max_new_tokens"] is not None and kw["max_new_tokens"] < 1:
        raise CompressorError(f"--max-new-tokens must be at least 1, got {kw['max_new_tokens']}")
    if kw["timeout"] <= 0:
        raise CompressorError(f"--timeout must be positive, got {kw['timeout']}")
    opts = {k: kw[k] for k in ("seq_len", "limit", "device", "dtype", "batch_size", "max_new_tokens", "samples_per_task",
                               "temperature", "top_p", "workers", "timeout", "seed", "include_path", "num_fewshot", "adapter")}
    opts["pass_k"] = _ints(kw["pass_k"])
    return opts


def _describe(task: str, res: dict) -> str:
    if "ppl" in res:
        return f"ppl {res['ppl']:.4f} ({res['windows']} windows of {res['seq_len']} tokens)"
    if "per_task" in res:
        ks = " ".join(f"{k} {v:.3f}" for k, v in res.items() if k.startswith("pass@"))
        mode = "greedy" if not res["generation"]["do_sample"] else f"sampled, T={res['generation']['temperature']}"
        return f"{ks} ({res['n_problems']} problems x {res['n_samples']} samples, {mode})"
    from compressor.eval.report import metrics_of

    return " ".join(f"{k} {v:.4f}" for k, v in metrics_of(task, res).items()) + f" ({res.get('n_samples')} documents, lm-eval)"


def _output_file(ctx, param, value):
    """Check an output file option before any model loads, so results are not lost at the end."""
    if value is not None:
        from compressor.files import check_output_file

        check_output_file(value, param.opts[0])
    return value


def _output_dir(ctx, param, value):
    if value is not None:
        from compressor.files import check_output_dir

        check_output_dir(value, param.opts[0])
    return value


@cli.command("eval")
@click.argument("model", required=False)
@_eval_options
@click.option("-o", "--out", type=click.Path(path_type=Path), callback=_output_file, help="Write results as JSON here.")
@click.option("--self-check", is_flag=True, help="Instead of a model: check the HumanEval harness (canonical solutions pass, broken ones fail).")
def evaluate(model, out, self_check, **kw):
    """Evaluate MODEL (anything `compressor compress` wrote, a model folder, a .gguf, 'demo')."""
    from compressor.files import write_json

    if self_check:
        if model is not None:
            raise CompressorError("--self-check checks the harness and takes no MODEL; run it on its own")
        from compressor.eval.humaneval import self_check as run_check

        if kw["limit"] is not None and kw["limit"] < 1:
            raise CompressorError(f"--limit must be at least 1, got {kw['limit']}")
        report = run_check(limit=kw["limit"], workers=kw["workers"], timeout=kw["timeout"])
        canon = report["canonical"]
        click.echo(f"canonical solutions: {canon['passed']}/{canon['total']} pass")
        for name, res in report.items():
            if isinstance(res, dict) and "failed" in res:
                click.echo(f"broken solutions ({name}): {res['failed']}/{res['total']} fail")
        for task, why in canon["unexpected_failures"].items():
            click.echo(f"  unexpected failure {task}: {why.splitlines()[-1] if why else ''}")
        click.echo(f"self-check {'passed' if report['ok'] else 'FAILED'} in {report['wall_seconds']:.1f} s")
        if out is not None:
            write_json(out, report)
            click.echo(f"wrote {out}")
        if not report["ok"]:
            sys.exit(1)
        return
    if model is None:
        raise CompressorError("missing MODEL: pass a model folder, a .gguf file or 'demo' (or --self-check)")
    from compressor.eval.runner import evaluate_model

    opts = _run_options(kw)
    results = evaluate_model(model, _tasks(kw["tasks"]), **opts)
    for task, res in results["tasks"].items():
        click.echo(f"{task}: {_describe(task, res)} [{res['seconds']:.1f} s]")
    if out is not None:
        write_json(out, results)
        click.echo(f"wrote {out}")


@cli.command()
@click.argument("dense")
@click.argument("compressed", nargs=-1, required=True)
@_eval_options
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, callback=_output_file,
              help="Markdown table; the same name with .json gets the data.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), callback=_output_file, help="Also draw the comparison as a PNG (needs matplotlib).")
def compare(dense, compressed, out, plot_path, **kw):
    """Table of DENSE against COMPRESSED models: size, parameters, each metric and its change.

    Each argument is a results file of `compressor eval -o` (reused) or a model (evaluated on --tasks).
    """
    from compressor.eval import report

    specs = [dense, *compressed]
    opts = _run_options(kw)
    tasks = _tasks(kw["tasks"]) if any(not report.is_results_file(s) for s in specs) else None
    if plot_path is not None:
        from compressor.eval import plots

        if not plots.available():
            raise CompressorError(plots.INSTALL_HINT)
    results = report.gather(specs, tasks, **opts)
    table = report.compare(results)
    md_path, json_path = report.write(table, out, results)
    click.echo(report.markdown(table), nl=False)
    click.echo(f"wrote {md_path} and {json_path}")
    if plot_path is not None:
        from compressor.eval import plots

        click.echo(f"wrote {plots.comparison(table, plot_path)}")


@cli.command()
@click.argument("model")
@click.option("-r", "--recipe", default="welore", show_default=True, help="Recipe whose rank allocation to show.")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), help="Target reduction (overrides the recipe).")
@click.option("--calib", help="Calibration data for data-aware recipes (overrides the recipe's).")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), callback=_output_dir,
              help="Write spectra.png and ranks.png into this folder (a curve: curve.png and curve.json; needs matplotlib).")
@click.option("--per-matrix/--summary-only", default=True, show_default=True, help="Print a line per matrix, or only the summary.")
@click.option("--device", type=DEVICES, default="auto", show_default=True)
@click.option("--target-size", "target_sizes", help="Instead, the size-quality curve: comma-separated budgets (0.7x,0.8x or 700MB,900MB), each "
              "compressed with the 'target' recipe and measured beside --against; needs --plots.")
@click.option("--target-bits", help="Curve budgets in bits per decoder-linear weight, comma-separated (3.5,4,4.5); with or instead of --target-size.")
@click.option("--against", help="Curve: comma-separated recipes (names or YAML paths) measured beside it [default: gptq4].")
@click.option("--eval-limit", type=IntCap(1, MAX_COUNT), default=8, show_default=True, help="Curve: code perplexity windows per row.")
@click.option("--eval-seq-len", type=IntCap(2, MAX_COUNT), default=512, show_default=True, help="Curve: perplexity window in tokens.")
def analyze(model, recipe, ratio, calib, plots_dir, per_matrix, device, target_sizes, target_bits, against, eval_limit, eval_seq_len):
    """Show, per decoder linear, the rank a recipe would keep and the spectrum energy it keeps; or,
    with --target-size/--target-bits, measure and plot size against code perplexity."""
    from compressor import analyze as analysis

    given = [n for n in click.get_current_context().params if click.get_current_context().get_parameter_source(n).name != "DEFAULT"]
    curve_only, ranks_only = {"target_sizes", "target_bits", "against", "eval_limit", "eval_seq_len"}, {"recipe", "ratio", "per_matrix"}
    if set(given) & {"target_sizes", "target_bits"}:
        if set(given) & ranks_only or plots_dir is None:
            wrong = "--plots DIR (where curve.png and curve.json go)" if plots_dir is None else f"no {_flag(sorted(set(given) & ranks_only)[0])}"
            raise CompressorError(f"a curve (--target-size/--target-bits) needs {wrong}; -r, --ratio and --per-matrix belong to the rank analysis")
        return _curve(model, target_sizes, target_bits, against, eval_limit, eval_seq_len, device, calib, plots_dir)
    if set(given) & curve_only:
        raise CompressorError(f"{_flag(sorted(set(given) & curve_only)[0])} belongs to a curve: add --target-size or --target-bits")
    if plots_dir is not None:
        from compressor.eval import plots

        # Checked before the model loads, so a missing matplotlib costs no minutes.
        if not plots.available():
            raise CompressorError(plots.INSTALL_HINT)
    rows = analysis.analyze(model, recipe, ratio=ratio, device=device, calib=calib)
    if per_matrix:
        for row in rows:
            rank = "dense" if row["rank"] is None else str(row["rank"])
            click.echo(f"{row['name']:<40} {row['shape'][0]:>6}x{row['shape'][1]:<6} rank {rank:>6}  kept energy {row['kept_energy']:.4f}")
    click.echo(analysis.summary(rows))
    if plots_dir is not None:
        title = f"{model}: recipe '{recipe}'" + (f" at ratio {ratio}" if ratio is not None else "")
        for path in analysis.plot(rows, plots_dir, title):
            click.echo(f"wrote {path}")


def _flag(param: str) -> str:
    return {"target_sizes": "--target-size", "per_matrix": "--per-matrix/--summary-only", "recipe": "-r/--recipe"}.get(param, f"--{param.replace('_', '-')}")


def _curve(model, target_sizes, target_bits, against, eval_limit, eval_seq_len, device, calib, plots_dir):
    from compressor import curve

    sizes = curve.split_list(target_sizes, "--target-size") if target_sizes is not None else []
    bits = curve.parse_bits(target_bits) if target_bits is not None else []
    others = curve.AGAINST if against is None else curve.split_list(against, "--against")
    result = curve.target_curve(model, sizes, bits, others, eval_limit=eval_limit, eval_seq_len=eval_seq_len,
                                device=device, calib=calib, out_dir=plots_dir)
    for line in curve.lines(result):
        click.echo(line)


@cli.command("recipes")
def list_recipes():
    """List the shipped recipes; [recommended: GOAL] marks the one to start from for each goal."""
    from compressor import recipe

    for entry in recipe.catalogue():
        mark = f"  [recommended: {recipe.GOALS[entry['goal']]}]" if entry["goal"] else ""
        click.echo(f"{entry['name']:<26} {entry['description']}{mark}")


def _verbose(args: list[str]) -> bool:
    """-v/--verbose among the global options (those before the command name)."""
    for arg in args:
        if not arg.startswith("-"):
            return False
        if arg in ("-v", "--verbose"):
            return True
    return False


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(code)


def _on_signal(signum, frame):
    import signal

    from compressor.errors import Interrupted

    # One-shot: a second signal must not break off the cleanup the first one started.
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def main() -> None:
    """Run the CLI; every failure ends in one `error: ...` line on stderr (docs/reference/errors.md):
    exit 2 bad input, 3 environment fault, 1 internal error (-v shows the traceback),
    130/143 interrupted by SIGINT/SIGTERM (temporary folders are removed as for any error)."""
    import signal as signals
    import traceback

    from compressor.errors import Interrupted, environment_fault

    args = sys.argv[1:]
    verbose = _verbose(args)
    previous = {}
    try:
        for s in (signals.SIGTERM, signals.SIGINT):
            previous[s] = signals.signal(s, _on_signal)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        try:
            code = cli.main(args=args, prog_name="compressor", standalone_mode=False)
        finally:
            for s, handler in previous.items():
                signals.signal(s, handler)
    except CompressorError as exc:
        _fail(str(exc), exc.exit_code)
    except Interrupted as exc:
        _fail(str(exc), exc.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if isinstance(exc, click.UsageError) and ctx is not None else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except MemoryError:
        _fail("out of memory; use --stream, a machine with more memory, or fewer --samples", 3)
    except Exception as exc:
        fault = environment_fault(exc, "a file operation failed")
        if fault is not None:
            _fail(str(fault), fault.exit_code)
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (run with -v for the traceback)"
        _fail(f"internal error: {type(exc).__name__}: {_one_line(exc) or 'no message'}{hint}", 1)
    if isinstance(code, int) and code:
        sys.exit(code)

"""What a recipe would do to a model, without doing it: per-matrix ranks, kept energy, spectra."""

from __future__ import annotations

from pathlib import Path

from compressor import distributed, ranks
from compressor import recipe as recipes
from compressor.calibration import driver
from compressor.calibration.windows import calibration_windows
from compressor.environment import resolve_device
from compressor.errors import CompressorError
from compressor.eval import plots
from compressor.loading import load_model
from compressor.methods.base import target_shapes


def analyze(model, recipe: str = "welore", ratio: float | None = None, device: str = "auto", tokenizer=None, calib: str | None = None) -> list[dict]:
    """Rows of {name, shape, rank (None = dense), kept_energy, params_before, params_after, energies}.

    kept_energy is the share of the truncated matrix's squared singular values that the rank keeps
    (for data-aware methods, of the whitened matrix, i.e. of the output energy on calibration data).
    """
    rec = recipes.load(recipe, ratio) if isinstance(recipe, str) else recipe
    stage = next((s for s in rec.stages if s.kind == "rank"), None)
    if stage is None:
        raise CompressorError(f"recipe '{rec.name}' has no rank-reduction stage to analyse")
    if isinstance(model, str):
        model, tokenizer = load_model(model)
    shapes = target_shapes(model, stage)  # fails before any calibration when targets match nothing
    dev = resolve_device(device)
    windows = None
    if stage.needs_gram:
        if tokenizer is None:
            raise CompressorError(f"recipe '{rec.name}' is data-aware, so analysing an in-memory model needs its tokenizer")
        windows = calibration_windows(rec, tokenizer, calib)
    energies: dict = {}
    executor = distributed.executor()
    driver.walk(model, dev, lambda i, layer, grams: energies.update(stage.layer_energies(model, i, layer, grams, executor)), windows,
                rec.calibration.batch_size, desc="spectra")
    energies = executor.merge_layers(energies, "spectra")
    allocation = stage.allocate(shapes, energies)
    rows = []
    for name, e in energies.items():
        k, shape = allocation[name], shapes[name]
        kept = 1.0 if k is None else float(e[:k].sum() / e.sum().clamp_min(1e-30))
        after = shape[0] * shape[1] if k is None else ranks.lowrank_params(shape, k, stage.extra_params(shape))
        rows.append({
            "name": name, "shape": shape, "rank": k, "kept_energy": kept,
            "params_before": shape[0] * shape[1], "params_after": after,
            "break_even_rank": ranks.max_saving_rank(shape, stage.extra_params(shape)), "energies": e,
        })
    return rows


def summary(rows: list[dict]) -> str:
    """A few lines: how many matrices are factorised, ranks, parameters before and after."""
    factored = [r for r in rows if r["rank"] is not None]
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    lines = [
        f"{len(factored)} of {len(rows)} targeted linears factorised"
        + (f", ranks {min(r['rank'] for r in factored)}..{max(r['rank'] for r in factored)}" if factored else ""),
        f"targeted-linear parameters {before:,} -> {after:,} ({(after - before) / before:+.1%})",
    ]
    by_type: dict[str, list[dict]] = {}
    for r in rows:
        by_type.setdefault(_local_name(r["name"]), []).append(r)
    for local, group in by_type.items():
        kept = sum(r["kept_energy"] for r in group) / len(group)
        dense = sum(r["rank"] is None for r in group)
        frac = [r["rank"] / min(r["shape"]) for r in group if r["rank"] is not None]
        rank_part = f"mean rank {sum(frac) / len(frac):.0%} of full" if frac else "all dense"
        lines.append(f"  {local:<24} {rank_part:<24} dense {dense}/{len(group)}  mean kept energy {kept:.3f}")
    return "\n".join(lines)


def _local_name(name: str) -> str:
    return plots.split_name(name)[1]


def plot(rows: list[dict], folder: str | Path, title: str) -> list[Path]:
    """spectra.png and ranks.png in `folder`; needs matplotlib."""
    folder = Path(folder)
    return [plots.spectra(rows, folder / "spectra.png", title), plots.rank_map(rows, folder / "ranks.png", title)]

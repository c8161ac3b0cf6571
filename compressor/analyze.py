"""What a recipe would do to a model, without doing it: per-matrix ranks and kept energy."""

from __future__ import annotations

from compressor import pipeline
from compressor import recipe as recipes
from compressor.errors import CompressorError


def analyze(model, recipe: str = "welore", ratio: float | None = None, device: str = "auto", tokenizer=None, calib: str | None = None) -> list[dict]:
    """Rows of {name, shape, rank (None = dense), kept_energy} for every targeted linear.

    kept_energy is the share of the truncated matrix's squared singular values that the rank keeps
    (for data-aware methods, of the whitened matrix, i.e. of the output energy on calibration data).
    """
    from compressor import models

    rec = recipes.load(recipe, ratio) if isinstance(recipe, str) else recipe
    stage = next((s for s in rec.stages if s.kind == "rank"), None)
    if stage is None:
        raise CompressorError(f"recipe '{rec.name}' has no rank-reduction stage to analyse")
    if isinstance(model, str):
        from compressor.loading import load_model

        model, tokenizer = load_model(model)
    dev = pipeline.resolve_device(device)
    windows = None
    if stage.needs_gram:
        from compressor.api import calibration_windows

        windows = calibration_windows(rec, tokenizer, calib)
    energies = pipeline.collect_energies(model, stage, dev, windows, rec.calibration.batch_size)
    shapes = {n: tuple(models.weight_of(m).shape) for n, _, m in models.iter_linears(model) if n in energies}
    ranks = stage.allocate(shapes, energies)
    rows = []
    for name, e in energies.items():
        k = ranks[name]
        kept = 1.0 if k is None else float(e[:k].sum() / e.sum().clamp_min(1e-30))
        rows.append({"name": name, "shape": shapes[name], "rank": k, "kept_energy": kept, "energies": e})
    return rows

"""PNG figures: singular-value spectra, rank allocations, and comparison charts.

Figures are built with matplotlib's object API (`Figure` + its Agg canvas), never pyplot, so
nothing here changes the global backend of a notebook or script that imports compressor.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from compressor.errors import CompressorError
from compressor.files import write_atomic

INSTALL_HINT = 'plots need matplotlib, which is not installed: pip install matplotlib (or pip install -e ".[eval]")'
_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def split_name(name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj')."""
    m = _LAYER.match(name)
    return (int(m.group(2)), m.group(3)) if m else (0, name)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CompressorError(INSTALL_HINT) from None
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")


def _grouped(rows: list[dict]) -> tuple[list[str], int, dict]:
    """Linear names inside a layer (in model order), number of layers, {(layer, local): row}."""
    cells, types = {}, []
    for r in rows:
        layer, local = split_name(r["name"])
        cells[(layer, local)] = r
        if local not in types:
            types.append(local)
    n_layers = max(layer for layer, _ in cells) + 1 if cells else 0
    return types, n_layers, cells


def spectra(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """One panel per linear type: normalised singular values of every layer, the kept rank marked."""
    types, n_layers, cells = _grouped(rows)
    if not types:
        raise CompressorError("nothing to plot: no analysed matrices")
    ncols = min(4, len(types))
    nrows = math.ceil(len(types) / ncols)
    fig = _figure(4.0 * ncols + 1.0, 3.2 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    from matplotlib import colormaps, colors
    from matplotlib.cm import ScalarMappable

    cmap = colormaps["viridis"]
    norm = colors.Normalize(vmin=0, vmax=max(1, n_layers - 1))
    for ax, local in zip(axes.flat, types):
        shape = break_even = None
        for layer in range(n_layers):
            row = cells.get((layer, local))
            if row is None:
                continue
            shape, break_even = row["shape"], row["break_even_rank"]
            s = row["energies"].double().clamp_min(0).sqrt()
            s = (s / s[0].clamp_min(1e-30)).numpy()
            color = cmap(norm(layer))
            ax.plot(range(1, len(s) + 1), s, color=color, lw=1.0, alpha=0.85)
            if row["rank"] is not None:
                ax.plot([row["rank"]], [s[row["rank"] - 1]], "o", ms=4.5, color=color, mec="black", mew=0.5)
        if break_even is not None:
            # Past this rank the two factors hold more numbers than the dense matrix.
            ax.axvline(break_even, color="0.4", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_title(f"{local}  {shape[0]}x{shape[1]}" if shape else local, fontsize=10)
        ax.set_xlabel("component", fontsize=9)
        ax.set_ylabel("σ_i / σ_1", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(types):]:
        ax.set_visible(False)
    from matplotlib.ticker import MaxNLocator

    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="layer", shrink=0.8)
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.suptitle(
        (title + "\n" if title else "") + "dots: rank the recipe keeps (none: kept dense); dotted line: break-even rank",
        fontsize=10,
    )
    return _save(fig, path)


def rank_map(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Two heatmaps over layers x linear types: kept rank (share of full rank) and kept energy."""
    import numpy as np

    types, n_layers, cells = _grouped(rows)
    if not types:
        raise CompressorError("nothing to plot: no analysed matrices")
    frac = np.full((n_layers, len(types)), np.nan)
    energy = np.full((n_layers, len(types)), np.nan)
    labels = [["" for _ in types] for _ in range(n_layers)]
    for (layer, local), r in cells.items():
        j = types.index(local)
        frac[layer, j] = 1.0 if r["rank"] is None else r["rank"] / min(r["shape"])
        energy[layer, j] = r["kept_energy"]
        labels[layer][j] = "dense" if r["rank"] is None else str(r["rank"])
    width = max(8.0, 1.6 * len(types) + 2.0)
    fig = _figure(width, 0.32 * n_layers + 2.4)
    ax_rank, ax_energy = fig.subplots(1, 2)
    for ax, data, label, fmt in (
        (ax_rank, frac, "kept rank / full rank (numbers: rank)", None),
        (ax_energy, energy, "kept share of spectrum energy", "{:.2f}"),
    ):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(range(len(types)), [t.rsplit(".", 1)[-1] for t in types], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
        ax.set_ylabel("layer", fontsize=9)
        fig.colorbar(im, ax=ax, label=label, shrink=0.9)
        if n_layers <= 64 and len(types) <= 16:
            for i in range(n_layers):
                for j in range(len(types)):
                    if np.isnan(data[i, j]):
                        continue
                    text = labels[i][j] if fmt is None else fmt.format(data[i, j])
                    ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color="white" if data[i, j] < 0.6 else "black")
    ax_rank.set_title("rank allocation", fontsize=10)
    ax_energy.set_title("energy kept", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def comparison(table: dict, path: str | Path) -> Path:
    """Bar chart per metric of a `compressor.eval.report.compare` table (each model against the dense
    one), and per metric a scatter of it against size on disk, each point labelled with its value."""
    metrics = table["metrics"]
    if not metrics:
        raise CompressorError("nothing to plot: the comparison has no metrics")
    panels = [("parameters", "parameters (M)", lambda r: r["parameters"] / 1e6 if r["parameters"] else None)]
    panels += [
        (m["key"], m["label"] + (" (lower is better)" if m["lower_is_better"] else " (higher is better)"), lambda r, k=m["key"]: r["metrics"].get(k))
        for m in metrics
    ]
    # Size against quality, one panel per metric, when sizes are known: the picture a size budget
    # is chosen from (e.g. --target-size runs beside the uniform recipes).
    sized = [r for r in table["rows"] if r.get("disk_bytes")]
    scatters = [m for m in metrics if len(sized) >= 2]
    ncols = min(3, len(panels) + len(scatters))
    nrows = math.ceil((len(panels) + len(scatters)) / ncols)
    fig = _figure(4.2 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    labels = [r["label"] for r in table["rows"]]
    for ax, m in zip(list(axes.flat)[len(panels):], scatters):
        for i, r in enumerate(table["rows"]):
            value = r["metrics"].get(m["key"])
            if r.get("disk_bytes") and value is not None:
                ax.scatter([r["disk_bytes"] / 1e6], [value], color="0.55" if i == 0 else f"C{i}", zorder=3)
                ax.annotate(f"{r['label']}\n{value:.3g}", (r["disk_bytes"] / 1e6, value), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("size on disk (MB)", fontsize=8)
        ax.set_title(f"{m['label']} against size", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.margins(x=0.2, y=0.2)
    for ax, (_, name, get) in zip(axes.flat, panels):
        values = [get(r) for r in table["rows"]]
        xs = [i for i, v in enumerate(values) if v is not None]
        bars = ax.bar(xs, [values[i] for i in xs], color=["0.55" if i == 0 else f"C{i}" for i in xs])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(panels) + len(scatters):]:
        ax.set_visible(False)
    return _save(fig, path)


def curve(result: dict, path: str | Path) -> Path:
    """Size on disk against perplexity of a `compressor.curve.target_curve` result: the target rows
    as one line (sorted by size), every other recipe as its own marker, the dense model as a dashed
    line; each point labelled with its perplexity, bits per decoder-linear weight and size."""
    task = result["task"]
    rows = result["rows"]
    fig = _figure(7.5, 5.0)
    ax = fig.subplots()
    targets = sorted((r for r in rows if r["kind"] == "target"), key=lambda r: r["size_bytes"])
    ax.plot([r["size_bytes"] / 1e6 for r in targets], [r[task] for r in targets], "o-", color="C0", label="--target-size / --target-bits", zorder=3)
    markers = "s^vDP*X"
    for i, r in enumerate(r for r in rows if r["kind"] == "recipe"):
        ax.plot([r["size_bytes"] / 1e6], [r[task]], markers[i % len(markers)], color=f"C{i + 1}", markersize=8, linestyle="none", label=r["row"], zorder=3)
    dense = next(r for r in rows if r["kind"] == "dense")
    ax.axhline(dense[task], color="0.55", linestyle="--", label=f"dense ({dense[task]:.4g})")
    ax.plot([dense["size_bytes"] / 1e6], [dense[task]], "o", color="0.55")
    for r in rows:
        # target rows labelled above their point, the others below, so that neighbours do not overlap
        below = r["kind"] != "target"
        ax.annotate(f"{r['row']}\nppl {r[task]:.2f}, {r['stored_bits']:.2f} b/w, {r['size_bytes'] / 1e6:.3g} MB", (r["size_bytes"] / 1e6, r[task]),
                    textcoords="offset points", xytext=(5, -20 if below else 6), fontsize=7)
    values = [r[task] for r in rows]
    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")  # a collapsed row (ppl in the thousands) would flatten the rest
    ev = result["eval"]
    ax.set_xlabel("size on disk (MB, every safetensors file)", fontsize=9)
    ax.set_ylabel(f"{task} ({ev['limit_windows'] or 'all'} windows of {ev['seq_len']} tokens; lower is better)", fontsize=9)
    ax.set_title(f"{result['model']} ({result['dtype']}): size against quality", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    ax.legend(fontsize=8)
    return _save(fig, path)

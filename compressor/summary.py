"""The table `compressor compress` prints: what was done, size, parameters, dtype, metrics, verdict.

It reads only the report (compression_report.json), so it imports nothing heavy and shows the same
facts a user finds in the output folder.
"""

from __future__ import annotations

COLLAPSE = 2.0  # a perplexity above this multiple of dense: the model is broken, say so
CLOSE = 1.10  # within 10 % of dense: "close to dense"

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:,.1f}"


def _change(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return ""
    return f"{(after - before) / before * 100:+.1f} %"


def actions(r: dict) -> list[str]:
    """One line per thing the recipe did: each stage wrote its own lines into the report."""
    return list(r.get("actions") or [])


def rows(r: dict, tasks: list[str]) -> list[tuple[str, str, str, str]]:
    dtype = r.get("dtype") or "float32"
    dense_bytes = r["params_before"] * _BYTES.get(dtype, 4)
    table = [
        (f"size on disk (MB, dense as {dtype})", _mb(dense_bytes), _mb(r.get("output_bytes")), _change(dense_bytes, r.get("output_bytes"))),
        ("parameters", f"{r['params_before']:,}", f"{r['params_after']:,}", _change(r["params_before"], r["params_after"])),
        ("decoder-linear parameters", f"{r['linear_params_before']:,}", f"{r['linear_params_after']:,}",
         _change(r["linear_params_before"], r["linear_params_after"])),
        ("dtype", dtype, dtype, ""),
    ]
    for task in tasks:
        before, after = (r["eval"][k][task].get("ppl") for k in ("before", "after"))
        table.append((task, f"{before:.3f}", f"{after:.3f}", _change(before, after)))
    return table


def verdict(r: dict, tasks: list[str]) -> str | None:
    """A plain sentence about quality, when perplexities were measured."""
    worst = None
    for task in tasks:
        before, after = (r["eval"][k][task].get("ppl") for k in ("before", "after"))
        if before and after is not None and (worst is None or after / before > worst[1]):
            worst = (task, after / before, before, after)
    if worst is None:
        return None
    task, factor, before, after = worst
    if factor > COLLAPSE or after != after:
        return (f"verdict: quality collapsed ({task} {after:,.2f} against {before:.2f} dense, x{factor:,.1f}); "
                "this model is not usable. Try a smaller --ratio or a larger --target-size, the recipe `compressor recipes` recommends for your goal, "
                "or more calibration --samples")
    if factor <= CLOSE:
        return f"verdict: close to dense ({task} {_change(before, after)})"
    return (f"verdict: degraded ({task} {_change(before, after)}); a smaller --ratio, a larger --target-size, "
            "or the 'size' recipe of `compressor recipes` keeps more")


def render(r: dict, model: str, out, tasks: list[str]) -> list[str]:
    lines = [f"compressed {model} with '{r['method']}' on {r['device']} in {r['wall_seconds']:.1f} s -> {out}"]
    lines += [f"  {line}" for line in actions(r)]
    table = rows(r, tasks)
    width = max(len(x[0]) for x in table)
    lines.append(f"  {'':<{width}}  {'before':>14}  {'after':>14}  {'change':>9}")
    lines += [f"  {name:<{width}}  {b:>14}  {a:>14}  {c:>9}" for name, b, a, c in table]
    if r.get("source_bytes"):
        lines.append(f"  (source file(s) on disk: {_mb(r['source_bytes'])} MB)")
    said = verdict(r, tasks)
    if said:
        lines.append(said)
    return lines

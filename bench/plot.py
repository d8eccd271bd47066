"""Draw BENCHMARKS.md's figure from the results bench/run.py wrote (needs matplotlib: the ``bench`` group).

    uv run --group bench python bench/plot.py                                   # bench/results/latest.json
    uv run --group bench python bench/plot.py RESULTS.json --out bench/figures/links.png

The figure: for each emulated link and checkpoint, the seconds each tool took (the median as a bar, the
fastest and slowest round as a line), on a log scale, since the links span from about 2 s (no link) to about
150 s (one connection on the far link). ``bench/run.py --link ... --plot PNG`` draws it at the end of the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
FIGURE = BENCH / "figures" / "links.png"
TOOLS = ("dinov3-fetcher", "aria2c + sha256", "curl + sha256", "hf download")
Stat = tuple[float, float, float]  # median, fastest, slowest


def link_series(results: dict[str, Any]) -> tuple[list[str], dict[str, list[Stat | None]]]:
    """From bench/run.py's JSON: the groups ("far, single file", ...) in the order they ran, and for each tool
    that ran on the links its (median, min, max) seconds per group (None where it did not run)."""
    times: dict[str, dict[str, list[float]]] = results["times"]
    keys = [k for k in times if k.startswith("link ") and len(k.split()) == 3]
    if not keys:
        raise SystemExit("no link results in this file: run bench/run.py with --link")
    groups = [f"{k.split()[1]}, {'single file' if k.split()[2] == 'single' else 'shards'}" for k in keys]
    tools = [t for t in TOOLS if any(times[k].get(t) for k in keys)]
    tools += sorted({t for k in keys for t in times[k] if t not in tools})
    series: dict[str, list[Stat | None]] = {}
    for tool in tools:
        series[tool] = [(statistics.median(xs), min(xs), max(xs)) if (xs := times[k].get(tool)) else None
                        for k in keys]
    return groups, series


def _save(fig: Any, ax: Any, out: Path) -> Path:
    """The legend, then the figure into ``out`` (a PNG)."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def draw_links(results: dict[str, Any], out: Path) -> Path:
    """Draw the links figure from ``results`` (bench/run.py's JSON) into ``out`` (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, series = link_series(results)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.0), dpi=120)
    for i, (tool, stats) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        have = [(x, s) for x, s in zip(xs, stats, strict=True) if s is not None]
        bars = ax.bar([x for x, _ in have], [s[0] for _, s in have], width, label=tool)
        ax.vlines([x for x, _ in have], [s[1] for _, s in have], [s[2] for _, s in have], colors="black",
                  linewidth=1)
        for bar, (_, s) in zip(bars, have, strict=True):
            ax.annotate(f"{s[0]:.1f}", (bar.get_x() + bar.get_width() / 2, s[2]), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median; line: fastest to slowest round)")
    ax.set_xticks(range(len(groups)), groups)
    versions = results.get("versions", {})
    size = results.get("size") or results.get("shard_size") or 0
    ax.set_title(f"{results.get('checkpoint', '')} {size / 1e9:.2f} GB checkpoint, "
                 f"{results.get('rounds', '?')} rounds, "
                 f"{versions.get('cpus', '?')} CPUs, {results.get('when', '')}", fontsize=9)
    return _save(fig, ax, out)


def draw_nodes(runs: list[dict[str, Any]], out: Path) -> Path:
    """The multi-node figure from bench/share.py's JSON (one or more runs, e.g. before and after): the job's
    seconds against the number of nodes, and the ideal S / B (one transfer at the nodes' rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    for run in runs:
        rows = run["rows"]
        ax.plot([r["nodes"] for r in rows], [r["seconds"] for r in rows], marker="o", label=run["label"])
        for r in rows:
            ax.annotate(f"{r['seconds']:.1f}", (r["nodes"], r["seconds"]), fontsize=7, xytext=(0, 4),
                        textcoords="offset points", ha="center")
    first = runs[0]
    ideal = first["size"] / first["rate"]
    ax.axhline(ideal, color="gray", linestyle="--", linewidth=1, label=f"S / B = {ideal:.1f} s")
    ax.set_xlabel("nodes")
    ax.set_ylabel("job seconds (the longest fetch_once)")
    ax.set_xticks(sorted({r["nodes"] for run in runs for r in run["rows"]}))
    ax.set_ylim(bottom=0)
    ax.set_title(f"{first['size'] / 1e6:.0f} MB to N nodes, each sending at most {first['rate'] * 8 / 1e6:.0f} Mbit/s",
                 fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, ax, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", type=Path, default=BENCH / "results" / "latest.json",
                    help="the JSON bench/run.py wrote (default: bench/results/latest.json)")
    ap.add_argument("--out", type=Path, default=FIGURE,
                    help=f"the PNG to write (default: {FIGURE.relative_to(BENCH.parent)})")
    args = ap.parse_args(argv)
    print(draw_links(json.loads(args.results.read_text()), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

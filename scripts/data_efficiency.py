"""CutMix's gain over no mixing against the training-set size, with the seed spread: a table and a plot.

Reads the ``results.json`` that ``compare.py`` writes, one folder per (training-set size, seed), each holding a
``cutmix`` and a ``baseline`` row, or one folder per method joined by commas. Give each as ``SIZE=FOLDER[,FOLDER]``:

    python scripts/data_efficiency.py --out docs/data_efficiency.png \\
        5000=results/n5k-s0 5000=results/n5k-s1 10000=results/n10k-s0 10000=results/n10k-s1
    python scripts/data_efficiency.py ... 5000=results/n5k-s2-cutmix,results/n5k-s2-baseline

The gain of one seed is CutMix's test accuracy minus no mixing's, both from that seed's runs (same seed, same
number of optimiser steps). The spread is the seed-to-seed half range: (max - min) / 2 over the seeds, of each
method's accuracy and of the gain; with two seeds it is half their difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(folders: list[Path]) -> dict[str, float]:
    """Test accuracy by method from the folders' results.json (one seed's runs)."""
    got = {r["method"]: r["test_acc"] for folder in folders for r in json.loads((folder / "results.json").read_text())
           if r.get("test_acc") is not None}
    missing = {"cutmix", "baseline"} - set(got)
    if missing:
        raise SystemExit(f"{', '.join(map(str, folders))}: no test accuracy for {', '.join(sorted(missing))} in "
                         "results.json")
    return got


def half_range(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else float("nan")


def summarize(runs: list[tuple[int, dict[str, float]]]) -> list[dict[str, float]]:
    """One row per training-set size: mean and half range of each method and of the per-seed gain."""
    rows = []
    for size in sorted({s for s, _ in runs}):
        seeds = [r for s, r in runs if s == size]
        cut, base = [r["cutmix"] for r in seeds], [r["baseline"] for r in seeds]
        gain = [c - b for c, b in zip(cut, base)]
        rows.append({"size": size, "seeds": len(seeds),
                     "cutmix": sum(cut) / len(cut), "cutmix_spread": half_range(cut),
                     "baseline": sum(base) / len(base), "baseline_spread": half_range(base),
                     "gain": sum(gain) / len(gain), "gain_spread": half_range(gain), "gains": gain})
    return rows


def table(rows: list[dict[str, float]]) -> str:
    pts = lambda v: f"{100 * v:+.2f}"  # noqa: E731
    out = ["| training images | seeds | CutMix | no mixing | gain (points) | gain per seed |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['size']:,} | {r['seeds']} | {r['cutmix']:.2%} ± {100 * r['cutmix_spread']:.2f} | "
                   f"{r['baseline']:.2%} ± {100 * r['baseline_spread']:.2f} | {pts(r['gain'])} ± "
                   f"{100 * r['gain_spread']:.2f} | {', '.join(pts(g) for g in r['gains'])} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    sizes = [r["size"] for r in rows]
    ax.errorbar(sizes, [100 * r["gain"] for r in rows], yerr=[100 * r["gain_spread"] for r in rows],
                marker="o", capsize=4, label="mean over seeds, ± half range")
    for r in rows:
        ax.scatter([r["size"]] * len(r["gains"]), [100 * g for g in r["gains"]], color="gray", s=12, zorder=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.set_xlabel("training images")
    ax.set_ylabel("CutMix - no mixing (test acc. points)")
    ax.set_title("ResNet-20: CutMix's gain, same optimiser steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="SIZE=FOLDER[,FOLDER]: compare.py output folder(s) of one size and seed")
    p.add_argument("--out", type=Path, default=Path("data_efficiency.png"))
    args = p.parse_args(argv)
    runs = []
    for item in args.runs:
        size, sep, folder = item.partition("=")
        if not sep or not size.isdigit():
            raise SystemExit(f"{item!r}: give SIZE=FOLDER, e.g. 5000=results/n5k-s0")
        runs.append((int(size), read([Path(f) for f in folder.split(",")])))
    rows = summarize(runs)
    print(table(rows))
    plot(rows, args.out)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()

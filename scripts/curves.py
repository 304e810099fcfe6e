"""Validation curves of finished runs, wherever they were made: one PNG and a markdown table.

It only reads (grid.py makes runs and plots their curves). Give it fit run folders (``runs/<name>/version_N``, the
folder holding the TensorBoard event files), for instance runs made on another machine and copied back:

    python scripts/curves.py --out docs/val_acc_gpu.png --threshold 0.85 --threshold 0.89 \\
        "100 epochs=runs/fast100/version_0" "200 epochs=runs/fast200/version_0"

For each run the table gives the epochs, the last and the best ``val/acc``, the training seconds (the span of its
event files, as grid.py counts them) and, per threshold, the first epoch whose ``val/acc`` reaches it and the
seconds from the run's first logged step to the end of that epoch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import events


def _named(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep:
        name, folder = Path(text).parent.name or text, text
    path = Path(folder)
    if not any(path.glob("events.out.tfevents.*")):
        raise argparse.ArgumentTypeError(f"{folder} holds no TensorBoard event file: give a fit run folder, "
                                         "e.g. runs/cutmix/version_0")
    return name, path


def summarize(name: str, folder: Path, thresholds: list[float]) -> dict[str, object]:
    fit, seconds = events.read_run(folder)
    val = events.points(fit, "val/acc")  # one per epoch, also where a resumed fit validated one again
    if not val:
        raise SystemExit(f"{folder}: no val/acc in its event files (was validation switched off?)")
    start = min(w for series in fit.values() for _, _, w in series)
    reach = {}
    for t in thresholds:
        hit = next(((i + 1, w - start) for i, (_, v, w) in enumerate(val) if v >= t), None)
        reach[t] = hit
    return {"name": name, "val_acc_curve": [v for _, v, _ in val], "last": val[-1][1],
            "best": max(v for _, v, _ in val), "seconds": seconds, "reach": reach}


def table(rows: list[dict[str, object]], thresholds: list[float]) -> str:
    head = "| run | epochs | last val/acc | best val/acc | training time |" + "".join(
        f" val/acc >= {t:.0%} |" for t in thresholds)
    lines = [head, "|" + "---|" * (5 + len(thresholds))]
    for r in rows:
        cells = [r["name"], str(len(r["val_acc_curve"])), f"{r['last']:.2%}", f"{r['best']:.2%}",
                 f"{r['seconds']:.0f} s"]
        for t in thresholds:
            hit = r["reach"][t]
            cells.append(f"epoch {hit[0]}, {hit[1]:.0f} s" if hit else "not reached")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=_named, metavar="[NAME=]RUN_DIR", help="fit run folders")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--title", default="ResNet-20 on CIFAR-10: validation accuracy")
    p.add_argument("--threshold", dest="thresholds", type=float, action="append", default=[],
                   help="a val/acc fraction to report the first epoch and time reaching it; repeatable")
    args = p.parse_args(argv)
    bad = [t for t in args.thresholds if not 0.0 < t <= 1.0]
    if bad:
        p.error(f"--threshold {bad[0]} is out of range: accuracies are fractions in (0, 1]")
    rows = [summarize(name, folder, args.thresholds) for name, folder in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not events.plot({r["name"]: r["val_acc_curve"] for r in rows}, args.out, args.title):
        p.error("matplotlib is not installed; fix: pip install matplotlib")
    print(table(rows, args.thresholds))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()

"""CutMix vs no mixing vs MixUp with the same seed and budget, through the CLI; a table and a plot.

Each method is one ``python -m cutmix_pl fit`` run (the recipe in ``configs/short.yaml`` by default, i.e. 15 epochs,
validating on the test set every epoch) followed by ``test`` on its last checkpoint. The script then reads the
TensorBoard event files and writes ``results.md`` (test accuracy, top-5, expected calibration error, wall time)
and ``val_acc.png`` (the validation-accuracy curves) into ``--out``.

    python scripts/compare.py --data-dir data --out results/short          # about 3 x 40 min on a 2-core CPU (results.md)
    python scripts/compare.py --data-dir data --out results/short --reuse  # finish or re-read earlier runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
METHODS = {  # overlays applied after the budget config
    "cutmix": [],
    "baseline": ["baseline.yaml"],
    "mixup": ["mixup.yaml"],
    "randaugment": ["randaugment.yaml"],  # RandAugment, then CutMix
}


def run_dir(out: Path, method: str) -> Path:
    return out / "runs" / method / "version_0"


def cli(subcommand: str, method: str, args: argparse.Namespace, extra: list[str]) -> None:
    configs = [args.budget, *METHODS[method]]
    cmd = [sys.executable, "-m", "cutmix_pl", subcommand]
    for c in configs:
        cmd += ["--config", str(CONFIGS / c)]
    cmd += ["--data.data_dir", str(args.data_dir), "--data.download", str(args.download).lower(),
            "--seed_everything", str(args.seed),
            "--trainer.logger.init_args.save_dir", str(args.out / "runs"),
            "--trainer.logger.init_args.name", method, "--trainer.logger.init_args.version", "0",
            "--trainer.enable_progress_bar", "false", *extra]
    if args.epochs is not None:
        cmd += ["--trainer.max_epochs", str(args.epochs)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if args.quiet else None)


def scalars(path: Path) -> dict[str, list[tuple[int, float, float]]]:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
    return {t: [(e.step, e.value, e.wall_time) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def summarize(out: Path, method: str) -> dict[str, object]:
    """Fit curves and timing from the fit run's events; test metrics from the test run's events."""
    test_dir = run_dir(out, method) / "test"  # `test --ckpt_path` of a run writes into the run's test/ folder
    test = read_fit(test_dir)[0] if test_dir.is_dir() else {}
    fit, seconds = read_fit(run_dir(out, method))
    curve = [v for _, v, _ in fit.get("val/acc", [])]
    return {
        "method": method,
        "val_acc_curve": curve,
        "test_acc": test["test/acc"][-1][1] if test else None,
        "test_top5": test["test/acc_top5"][-1][1] if test else None,
        "test_ece": test["test/ece"][-1][1] if test else None,
        "fit_minutes": seconds / 60 if seconds is not None else None,
    }


def read_fit(folder: Path) -> tuple[dict[str, list[tuple[int, float, float]]], float | None]:
    """The scalar series of a fit run folder and the seconds it spent training (None without events).

    One event file per process start of the fit, each read once: the series are joined in order, and the time
    spent training is summed file by file, so that the pause of an interrupted and resumed fit does not count.
    """
    fit: dict[str, list[tuple[int, float, float]]] = {}
    spans = []
    for events in sorted(folder.glob("events.out.tfevents.*")):
        part = scalars(events)
        for tag, series in part.items():
            fit.setdefault(tag, []).extend(series)
        walls = [w for series in part.values() for _, _, w in series]
        spans.append(max(walls) - min(walls) if walls else 0.0)
    return fit, (sum(spans) if spans else None)


def table(rows: list[dict[str, object]], header: str) -> str:
    lines = [header, "", "| method | test acc | top-5 | ECE (15 bins) | fit wall time |", "|---|---|---|---|---|"]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['method']} | {fmt(r['test_acc'], '.2%')} | {fmt(r['test_top5'], '.2%')} | "
                     f"{fmt(r['test_ece'], '.4f')} | {fmt(r['fit_minutes'], '.1f')} min |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, object]], path: Path,
         title: str = "ResNet-20 on CIFAR-10: same seed, same budget") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        curve = r["val_acc_curve"]
        ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], marker="o" if len(curve) <= 30 else None,
                ms=3, label=r["method"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--download", action="store_true", help="let the runs download CIFAR-10")
    p.add_argument("--out", type=Path, default=Path("results/short"))
    p.add_argument("--budget", default="short.yaml", help="config in configs/ that sets the budget")
    p.add_argument("--epochs", type=int, default=None, help="override the budget's max_epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=["cutmix", "baseline", "mixup"])
    p.add_argument("--reuse", action="store_true", help="skip finished fits and tests; resume interrupted fits")
    p.add_argument("--quiet", action="store_true", help="hide the runs' own output")
    args, extra = p.parse_known_args(argv)  # anything else goes to every CLI call, e.g. --data.train_size 1000
    args.out.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        last = run_dir(args.out, method) / "checkpoints" / "last.ckpt"
        done = run_dir(args.out, method) / "fit_done.json"  # written only when the fit run exits cleanly
        if not (args.reuse and done.is_file()):
            # an interrupted fit (a last.ckpt but no marker) continues where it stopped
            resume = ["--ckpt_path", str(last)] if args.reuse and last.is_file() else []
            cli("fit", method, args, [*extra, *resume])
            done.write_text(json.dumps({"resumed": bool(resume)}))
        if not (args.reuse and any((run_dir(args.out, method) / "test").glob("events.out.tfevents.*"))):
            cli("test", method, args, [*extra, "--ckpt_path", str(last)])
    rows = [summarize(args.out, m) for m in args.methods]
    header = (f"Budget `configs/{args.budget}`" + (f" with max_epochs={args.epochs}" if args.epochs else "")
              + f", seed {args.seed}; test metrics of the last epoch's checkpoint.")
    (args.out / "results.md").write_text(table(rows, header))
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "val_acc.png")
    print(table(rows, header))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'val_acc.png'}")
    return rows


if __name__ == "__main__":
    main()

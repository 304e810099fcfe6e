"""Training speed of ``python -m cutmix_pl fit`` in two (or more) checkouts, measured side by side in one run.

Each checkout runs the same short fit twice, with ``--short`` and ``--long`` training batches, and the difference of
the two wall times is the time of ``long - short`` steps: start-up, data loading and validation cancel out. The
checkouts take turns (interleaved repetitions) and the table reports medians, so that a shared, noisy machine
treats them alike. Example, the working tree against the last commit::

    git worktree add /tmp/before HEAD
    python scripts/bench_fit.py --data-dir data --reps 3 /tmp/before .

A variant is ``CHECKOUT`` or ``CHECKOUT::FLAGS`` (flags for that variant only), so settings compare the same way::

    python scripts/bench_fit.py . ".::--trainer.precision bf16-mixed --model.channels_last true"

``--events`` times instead the steps inside one ``--long`` fit, from the wall times of its logged ``train/lr`` values
(logged every 10 steps; the first ``--short`` steps are left out as warm-up): no start-up in the figure at all, which
matters where the per-step difference is small next to the start-up's noise (a tiny network, a loaded machine).

The fits start from configs/smoke.yaml, which trains on the CPU; on a GPU, give the accelerator as a flag for all
(flags after the variants go to every fit)::

    python scripts/bench_fit.py --events --data-dir data --batch-size 512 --short 20 --long 80 --reps 1 \\
        . ".::--data.compile_transform true" --trainer.accelerator gpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import events

EVENTS_EVERY = 10  # --events: log_every_n_steps of the timed fit


def fit_command(variant: str, batches: int, args: argparse.Namespace, extra: list[str], save_dir: str
                ) -> tuple[Path, list[str]]:
    """The checkout a variant runs in (its working folder) and its ``fit`` command line."""
    folder, _, flags = variant.partition("::")
    return Path(folder), [
        sys.executable, "-m", "cutmix_pl", "fit", "--config", "configs/smoke.yaml",
        "--data.data_dir", str(Path(args.data_dir).resolve()), "--data.download", "false",
        "--data.batch_size", str(args.batch_size), "--trainer.limit_train_batches", str(batches),
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", save_dir, *extra,
        *flags.split()]


def fit_seconds(variant: str, batches: int, args: argparse.Namespace, extra: list[str]
                ) -> tuple[float, list[tuple[int, float]]]:
    """Wall time of one fit of ``batches`` training batches, and the (step, wall time) of its logged steps."""
    with tempfile.TemporaryDirectory() as tmp:
        checkout, cmd = fit_command(variant, batches, args, extra, tmp)
        env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
        start = time.perf_counter()
        subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        logged = [events.scalars(f).get("train/lr", []) for f in Path(tmp).rglob("events.out.tfevents.*")]
        return seconds, [(step, wall) for series in logged for step, _, wall in series]


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The arguments, and the flags left for every fit (--events adds its logging interval to them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="CHECKOUT (a folder holding cutmix_pl) or CHECKOUT::FLAGS")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--short", type=int, default=5, help="training batches of the short fit (>= 2)")
    parser.add_argument("--long", type=int, default=25, help="training batches of the long fit")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median taken)")
    parser.add_argument("--events", action="store_true", help="time the logged steps inside one --long fit")
    args, extra = parser.parse_known_args(argv)
    if not args.long > args.short >= 2:  # Lightning reads a limit of 1 as 1.0, all the batches
        parser.error(f"--long={args.long} must be greater than --short={args.short} >= 2")
    if args.events:  # steps are logged every EVENTS_EVERY: the fit must log two of them after the warm-up
        first = args.short + (EVENTS_EVERY - 1 - args.short) % EVENTS_EVERY
        if args.long < first + EVENTS_EVERY + 1:
            parser.error(f"--events needs two logged steps (every {EVENTS_EVERY}th) from --short {args.short} on; "
                         f"fix: a --long of at least {first + EVENTS_EVERY + 1}")
        extra = [*extra, "--trainer.log_every_n_steps", str(EVENTS_EVERY)]
    return args, extra


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, extra = parse(argv)
    rates: dict[str, list[float]] = {v: [] for v in args.variants}
    for rep in range(args.reps):
        for variant in args.variants:
            if args.events:
                timed = [e for e in fit_seconds(variant, args.long, args, extra)[1] if e[0] >= args.short]
                (s0, w0), (s1, w1) = timed[0], timed[-1]
                rate, how = (s1 - s0) * args.batch_size / (w1 - w0), f"steps {s0}-{s1} in {w1 - w0:.2f} s"
            else:
                short = fit_seconds(variant, args.short, args, extra)[0]
                long = fit_seconds(variant, args.long, args, extra)[0]
                rate, how = (args.long - args.short) * args.batch_size / (long - short), f"{short:.1f} s / {long:.1f} s"
            rates[variant].append(rate)
            print(f"rep {rep}: {variant}: {rate:,.0f} img/s ({how})", flush=True)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    first = medians[args.variants[0]]
    print(f"\nfit training speed, batch {args.batch_size}, median of {args.reps} interleaved repetitions:")
    print("| variant | img/s (median) | runs | vs first |\n|---|---|---|---|")
    for name, rate in medians.items():
        runs = ", ".join(f"{r:,.0f}" for r in rates[name])
        print(f"| {name} | {rate:,.0f} | {runs} | {rate / first:.2f}x |")
    return medians


if __name__ == "__main__":
    main()

"""Images per second of batched CutMix: ours (elem, batch) vs timm ``Mixup`` (cutmix, elem, batch) vs torchvision.

    python scripts/bench_augment.py                      # batch 256 and 1024, on the CPU and on CUDA if present
    python scripts/bench_augment.py --reps 21 --min-time 0.3 --devices cuda

Every method gets the same float32 normalised batch [B, 3, 32, 32] and int64 labels (10 classes) on the device,
and returns mixed images and soft targets. Methods run round-robin (the order rotates every repetition), each
repetition timing a block of calls lasting at least ``--min-time`` seconds; the table reports the median over
repetitions, so a noisy, shared machine biases no method in particular. CUDA blocks are synchronised.

Configurations, all with alpha = 1 and every sample/batch mixed:
  ours elem         cutmix_pl.augment.CutMix(mode="elem")    a box and a lambda per sample
  ours batch        cutmix_pl.augment.CutMix(mode="batch")   one box for the batch
  ours compiled     (--compile) ours elem, its draws eager, its arithmetic (``apply``) through torch.compile
  timm elem         timm.data.Mixup(mixup_alpha=0, cutmix_alpha=1, prob=1, mode="elem")  (per-sample Python loop)
  timm batch        timm.data.Mixup(..., mode="batch")       (one box for the batch; mutates its input in place)
  torchvision       torchvision.transforms.v2.CutMix(alpha=1) (one box for the batch)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cutmix_pl.augment import CutMix

NUM_CLASSES = 10
TV = "torchvision v2.CutMix"
TIMM_ELEM = "timm Mixup elem"
GOALS = {"cpu": 5.0, "cuda": 20.0}  # ours elem vs timm elem


def build_methods(num_classes: int = NUM_CLASSES, compile: bool = False
                  ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], Any]]:
    """name -> f(images, labels) returning (mixed images, soft targets); timm is optional."""
    methods: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
        "ours CutMix elem": CutMix(alpha=1.0, prob=1.0, num_classes=num_classes, mode="elem"),
        "ours CutMix batch": CutMix(alpha=1.0, prob=1.0, num_classes=num_classes, mode="batch"),
    }
    if compile:  # the draws stay eager (torch.compile takes no generator); the rest is one compiled graph
        mixer = CutMix(alpha=1.0, prob=1.0, num_classes=num_classes, mode="elem")
        apply = torch.compile(mixer.apply, dynamic=False)
        methods["ours CutMix elem compiled"] = lambda x, y: apply(x, y, mixer.draw(x))[:2]
    try:
        from timm.data import Mixup
    except ImportError:
        print("timm is not installed: its columns are left out", file=sys.stderr)
    else:
        for mode in ("elem", "batch"):
            methods[f"timm Mixup {mode}"] = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, mode=mode,
                                                  label_smoothing=0.0, num_classes=num_classes)
    from torchvision.transforms import v2

    methods[TV] = v2.CutMix(num_classes=num_classes, alpha=1.0)
    return methods


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _block(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return time.perf_counter() - start


def measure(methods: dict[str, Callable[..., Any]], batch: int, device: torch.device, reps: int,
            min_time: float, seed: int = 0) -> dict[str, list[float]]:
    """Images per second of every method, ``reps`` interleaved repetitions each."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=gen).to(device)  # like a normalised batch
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    calls: dict[str, Callable[[], Any]] = {}
    for name, method in methods.items():
        if name.startswith("timm") and batch % 2:
            continue  # timm's Mixup needs an even batch
        x = images.clone()  # timm mixes in place: each method gets its own copy, so no one sees another's output
        calls[name] = lambda m=method, x=x: m(x, labels)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    count: dict[str, int] = {}
    for name, fn in calls.items():  # warm up, then size each block to last at least min_time
        _block(fn, 2, device)
        once = max(_block(fn, 1, device), 1e-6)
        count[name] = max(1, round(min_time / once)) if min_time > 0 else 1
    rates: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order every repetition
            rates[name].append(batch * count[name] / _block(calls[name], count[name], device))
    return rates


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("device", "batch", "method", "img/s (median)", "img/s (q1 - q3)", "vs torchvision", "vs timm elem")
    body = [(r["device"], str(r["batch"]), r["method"], f"{r['img_per_s']:,.0f}",
             f"{r['q1']:,.0f} - {r['q3']:,.0f}",
             f"{r['vs_torchvision']:.2f}x" if r["vs_torchvision"] is not None else "-",
             f"{r['vs_timm_elem']:.2f}x" if r["vs_timm_elem"] is not None else "-") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                        help="default: cpu, plus cuda when available")
    parser.add_argument("--reps", type=int, default=11, help="interleaved repetitions per method (median taken)")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per timed block (0: one call)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--compile", action="store_true", help="add ours elem with its arithmetic compiled "
                        "(compiles once per batch size and device: seconds on a GPU, about 13 s on a 2-core CPU)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    methods = build_methods(compile=args.compile)
    rows: list[dict[str, Any]] = []
    print(f"torch {torch.__version__}; median of {args.reps} interleaved repetitions, "
          f"blocks of >= {args.min_time:g} s; float32 [B, 3, 32, 32], {NUM_CLASSES} classes, alpha 1")
    for dev_name in devices:
        device = torch.device(dev_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        print(f"{dev_name}: {hardware(device)}")
        for batch in args.batch_sizes:
            rates = measure(methods, batch, device, args.reps, args.min_time)
            medians = {k: statistics.median(v) for k, v in rates.items()}
            for name, rate in medians.items():
                q1, q3 = _quartiles(rates[name])
                rows.append({"device": dev_name, "batch": batch, "method": name, "img_per_s": rate, "q1": q1, "q3": q3,
                             "vs_torchvision": rate / medians[TV] if TV in medians else None,
                             "vs_timm_elem": rate / medians[TIMM_ELEM] if TIMM_ELEM in medians else None})
    print(format_table(rows))
    for r in rows:
        if r["method"] == "ours CutMix elem" and r["vs_timm_elem"] is not None:
            goal = GOALS.get(r["device"], 1.0)
            ok = r["vs_torchvision"] >= 1.0 and r["vs_timm_elem"] >= goal
            print(f"goal {r['device']} batch {r['batch']}: ours elem >= 1x torchvision and >= {goal:g}x timm elem: "
                  f"{'met' if ok else 'NOT met'} ({r['vs_torchvision']:.2f}x, {r['vs_timm_elem']:.2f}x)")
    return rows


if __name__ == "__main__":
    main()

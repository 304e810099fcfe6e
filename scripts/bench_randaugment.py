"""RandAugment throughput: this project's batched per-image version against the usual ways, side by side in one run.

Methods (uint8 CIFAR-sized images, N=2, M=9, interleaved repetitions, medians):

- ``torchvision per image, main process``: ``v2.RandAugment`` called on each image in a Python loop;
- ``torchvision per image, DataLoader W workers``: the same in DataLoader worker processes (the conventional path;
  it scales with free CPU cores and cannot run on the GPU);
- ``torchvision whole batch``: ``v2.RandAugment`` on the batch tensor: one operation and magnitude for every image;
- ``kornia batch``: ``kornia.augmentation.auto.RandAugment`` (float input; one operation sequence per batch, per-image
  parameters), when kornia is installed;
- ``ours per image``: ``cutmix_pl.randaugment.RandAugment``: operations, signs and magnitudes per image, batched.

    python scripts/bench_randaugment.py --batch-sizes 128 512 --devices cpu cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cutmix_pl.randaugment import RandAugment

BASE = "torchvision per image, main process"
LOADER_BATCHES = 4  # batches one call of the DataLoader method augments (an epoch of its data set)


class _Augmented(Dataset):
    def __init__(self, images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


def _timed(fn: Callable[[], Any], device: torch.device, min_time: float) -> float:
    """Seconds per call of ``fn``, timing a block of calls lasting at least ``min_time`` seconds."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls


def methods(batch: torch.Tensor, workers: int) -> dict[str, Callable[[], Any]]:
    tv = v2.RandAugment(num_ops=2, magnitude=9)
    ours = RandAugment(num_ops=2, magnitude=9)
    gen = torch.Generator(device=batch.device).manual_seed(0)
    out: dict[str, Callable[[], Any]] = {
        BASE: lambda: [tv(img) for img in batch],
        "torchvision whole batch (one op per batch)": lambda: tv(batch),
        "ours per image": lambda: ours(batch, gen),
    }
    if batch.device.type == "cpu" and workers > 0:
        loader = DataLoader(_Augmented(batch.repeat(LOADER_BATCHES, 1, 1, 1), tv), batch_size=len(batch), num_workers=workers,
                            persistent_workers=True)
        next(iter(loader))  # start the workers outside the timing
        out[f"torchvision per image, DataLoader {workers} workers"] = lambda: [b for b in loader]
    try:
        from kornia.augmentation.auto import RandAugment as KorniaRandAugment

        kornia = KorniaRandAugment(n=2, m=9).to(batch.device)
        as_float = batch.float() / 255
        out["kornia batch (one op sequence per batch)"] = lambda: kornia(as_float)
    except ImportError:
        pass
    return out


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per method (median taken)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timed block")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the conventional path (0: off)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.reps} interleaved "
          "repetitions; N=2, M=9, uint8 3x32x32")
    rows: list[dict[str, Any]] = []
    for name in args.devices:
        device = torch.device(name)
        for batch_size in args.batch_sizes:
            batch = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
            fns = methods(batch, args.workers)
            rates: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(args.reps):
                for key, fn in fns.items():
                    rates[key].append(batch_size / _timed(fn, device, args.min_time))
            medians = {k: statistics.median(v) for k, v in rates.items()}
            for key, rate in medians.items():
                rate *= LOADER_BATCHES if "DataLoader" in key else 1
                rows.append({"device": name, "batch": batch_size, "method": key, "img_per_s": rate,
                             "vs_base": rate / medians[BASE]})
    print("| device | batch | method | img/s (median) | vs torchvision per image |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['batch']} | {r['method']} | {r['img_per_s']:,.0f} | {r['vs_base']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()

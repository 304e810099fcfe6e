"""Training throughput of three input pipelines feeding the same ResNet training step, side by side.

(a) this project's pipeline: the training set resident on the device, an on-device permutation, batched
    crop/flip/normalise and per-sample CutMix on the device (the DataModule's own code path);
(b) the conventional pipeline: a torchvision-style Dataset with per-image v2 RandomCrop, RandomHorizontalFlip,
    ToDtype and Normalize, ``v2.CutMix`` in ``collate_fn``, a DataLoader with pinned memory (on CUDA) and one worker per
    core, batches copied to the device;
(c) the ceiling: the same training step on one fixed, pre-made batch already on the device.

Same model, batch size and precision for all three. The three are run round-robin for several rounds and the
median of each is reported, so that a noisy machine affects them alike.

    python scripts/bench_train.py --data-dir data               # CPU, or the GPU when there is one
    python scripts/bench_train.py --data-dir data --device cuda --batch-size 512 --steps 100
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cutmix_pl import cifar
from cutmix_pl.augment import CutMix
from cutmix_pl.data import CIFAR10DataModule, ShardedBatchSampler, TensorBatchLoader
from cutmix_pl.module import SoftTargetCrossEntropy
from cutmix_pl.resnet import ResNet


class TorchvisionCIFAR(Dataset):
    """What a torchvision CIFAR-10 recipe does: one image at a time through v2 transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.images, self.labels, self.tv_tensors = images, labels, tv_tensors
        self.transform = v2.Compose([
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cifar.MEAN, cifar.STD),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.tv_tensors.Image(self.images[i])), int(self.labels[i])


class CutMixCollate:
    """``v2.CutMix`` applied to each collated batch, as torchvision's docs show (picklable for workers)."""

    def __init__(self, num_classes: int) -> None:
        from torchvision.transforms import v2

        self.cutmix = v2.CutMix(num_classes=num_classes, alpha=1.0)

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cutmix(*torch.utils.data.default_collate(samples))


def make_step(model: nn.Module, device: torch.device, precision: str, channels_last: bool
              ) -> Callable[[torch.Tensor, torch.Tensor], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = SoftTargetCrossEntropy()
    autocast = precision == "bf16" and device.type == "cuda"

    def step(x: torch.Tensor, t: torch.Tensor) -> None:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def ours(dm: CIFAR10DataModule, split: cifar.Split, batch_size: int, device: torch.device
         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The DataModule's training path: the loader it builds on the root device, then its ``augment``."""
    sampler = ShardedBatchSampler(len(split.labels), batch_size, shuffle=True, device=device)
    loader = TensorBatchLoader(split.images.to(device), split.labels.to(device), sampler)
    gen = torch.Generator(device=device).manual_seed(0)
    while True:
        for images, labels in loader:
            batch = dm.transform(images, labels, 0, gen)
            yield batch.images, batch.targets
        loader.batch_sampler.set_epoch(loader.batch_sampler.epoch + 1)


def conventional(split: cifar.Split, batch_size: int, workers: int, device: torch.device
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = DataLoader(TorchvisionCIFAR(split.images, split.labels), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, collate_fn=CutMixCollate(10),
                        prefetch_factor=4 if workers else None)
    while True:
        for x, t in loader:
            yield x.to(device, non_blocking=True), t.to(device, non_blocking=True)


def ceiling(split: cifar.Split, batch_size: int, device: torch.device, dm: CIFAR10DataModule
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    batch = dm.transform(split.images[:batch_size].to(device), split.labels[:batch_size].to(device), 0)
    while True:
        yield batch.images, batch.targets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable, source: Iterator, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` training steps fed from ``source`` (data time included)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(source))
    sync(device)
    return time.perf_counter() - start


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="training steps per pipeline per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per pipeline before the rounds")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers for (b)")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--precision", choices=["32", "bf16"], default=None, help="default: bf16 on CUDA, 32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (all three pipelines)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "32")
    channels_last = device.type == "cuda"

    torch.manual_seed(0)
    dm = CIFAR10DataModule(args.data_dir, download=False, val_size=0, batch_size=args.batch_size,
                           mixer=CutMix(alpha=1.0, prob=1.0))
    split = dm.split("train")

    model = ResNet(args.depth).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    step = make_step(net, device, precision, channels_last)
    sources = {
        "a: resident + batched CutMix": ours(dm, split, args.batch_size, device),
        "b: DataLoader + per-image v2 + v2.CutMix": conventional(split, args.batch_size, args.workers, device),
        "c: ceiling (fixed batch)": ceiling(split, args.batch_size, device, dm),
    }
    for source in sources.values():
        timed(step, source, args.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {k: [] for k in sources}
    for _ in range(args.rounds):  # round-robin, so drifts in machine load hit every pipeline alike
        for name, source in sources.items():
            times[name].append(timed(step, source, args.steps, device))
    ips = {k: args.batch_size * args.steps / statistics.median(v) for k, v in times.items()}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; ResNet-{args.depth}, batch {args.batch_size}, precision {precision}, "
          f"compile {args.compile}; median of {args.rounds} interleaved rounds x {args.steps} steps; "
          f"(b) uses {args.workers} workers")
    n_train = len(split.labels)
    print(f"{'pipeline':44s} {'img/s':>9s} {'epoch (s)':>10s}")
    for k, v in ips.items():
        print(f"{k:44s} {v:9.0f} {n_train / v:10.1f}")
    a, b, c = ips.values()
    print(f"ratio a/b = {a / b:.2f}   ratio a/c = {a / c:.2f}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak host memory: main process {own:.0f} MiB, largest worker {children:.0f} MiB")
    return {"a/b": a / b, "a/c": a / c, **ips}


if __name__ == "__main__":
    main()

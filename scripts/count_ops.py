"""How many operations each part of a training step dispatches: the launches a GPU step pays for, counted on any device.

    python scripts/count_ops.py                  # ResNet-20, batch 128, on the CPU
    python scripts/count_ops.py --device cuda    # the same on a GPU

For one call of each part it counts the top-level aten operations (those not called from inside another aten op)
that ``torch.profiler`` records: the training transform eager and compiled (``data.compile_transform``), the
network's forward and backward, and the optimiser step (SGD with ``foreach``, as the recipe). Views and shape
operations are counted too, so the figures bound the kernel launches from above.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from cutmix_pl.augment import CutMix
from cutmix_pl.resnet import ResNet
from cutmix_pl.transform import TrainTransform

NUM_CLASSES = 10  # of the synthetic labels (CIFAR-10's)


def count(fn: Callable[[], Any]) -> int:
    """Top-level aten operations dispatched by one call of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    return sum(1 for e in ops if not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled transform")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen).to(device)
    net = ResNet(args.depth).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
    transforms = {"transform (eager)": TrainTransform(CutMix(prob=0.5, num_classes=NUM_CLASSES))}
    if not args.no_compile:
        transforms["transform (compiled)"] = TrainTransform(CutMix(prob=0.5, num_classes=NUM_CLASSES), compile=True)
    for t in transforms.values():
        t.seed(0, device)
        t(images, labels)  # warm up: compile, caches
    batch = transforms["transform (eager)"](images, labels)

    def forward_backward() -> None:
        torch.nn.functional.cross_entropy(net(batch.images), batch.targets).backward()

    forward_backward()
    opt.step()  # the momentum buffers exist from here on, as in every later step
    counts = {name: count(lambda t=t: t(images, labels)) for name, t in transforms.items()}
    counts["forward + backward"] = count(forward_backward)
    counts["optimiser step"] = count(opt.step)
    print(f"ResNet-{args.depth}, batch {args.batch_size}, {device}; top-level aten ops per call:")
    for name, n in counts.items():
        print(f"  {name:24s} {n:5d}")
    return counts


if __name__ == "__main__":
    main()

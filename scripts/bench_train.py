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

``--settings`` times instead the ceiling's step (c) in several precisions and memory formats, each with its own copy
of the same initial network, round-robin (the order turned by one each round), and reports the medians and the ratio
to fp32 NCHW: the figures behind ``cutmix_pl/hardware.py``'s choice for a CPU. ``bf16`` is autocast to bfloat16, as
``--trainer.precision bf16-mixed`` runs it::

    python scripts/bench_train.py --data-dir data --device cpu --settings fp32-nchw fp32-cl bf16-nchw

A CPU with AVX-512 can measure what a CPU with AVX2 only (and so no bf16 instructions: bf16 emulated) would, by
limiting PyTorch's kernels (``ATEN_CPU_CAPABILITY``) and oneDNN's convolutions (``ONEDNN_MAX_CPU_ISA``) to AVX2;
both are read once at start, so set them on the command::

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/bench_train.py --data-dir data --device cpu \
        --settings fp32-nchw fp32-cl bf16-nchw

The first lines name what was measured: the CPU, torch's threads, the ATen CPU capability in use, the ISA oneDNN
reports using (from its verbose line) and whether it runs bf16 natively, with the two variables as set. An
emulated bf16 step is slow (tens of images a second at batch 128): keep ``--steps`` and ``--rounds`` small there.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cutmix_pl import cifar, hardware
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
    autocast = precision == "bf16"  # as Lightning's bf16-mixed: autocast on the CPU too

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


# --settings: (precision, channels-last) of each
SETTINGS = {"fp32-nchw": ("32", False), "fp32-cl": ("32", True), "bf16-nchw": ("bf16", False),
            "bf16-cl": ("bf16", True)}
ISA_PROBE = """
import torch
x, w = torch.randn(8, 16, 32, 32), torch.randn(16, 16, 3, 3)
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    torch.nn.functional.conv2d(x, w, padding=1)
"""


def onednn_isa() -> str:
    """The instruction set oneDNN says it uses ("Intel AVX2", ...), from its verbose line in a fresh process with this
    environment (ONEDNN_MAX_CPU_ISA is read at its first use); "unknown" where it prints none."""
    try:
        out = subprocess.run([sys.executable, "-c", ISA_PROBE], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        if ",isa:" in line:
            return line.partition(",isa:")[2].strip()
    return "unknown"


def cpu_report() -> list[str]:
    """What a CPU measurement ran on: the CPU, threads, and the instruction sets PyTorch and oneDNN use."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.partition(":")[2].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    flags = hardware.cpu_flags()
    try:
        onednn_bf16 = str(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = "unknown"
    env = {k: os.environ.get(k, "unset") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    choice = hardware.choose("cpu", cuda_available=False)
    return [
        f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        f"ATen CPU capability: {torch.backends.cpu.get_cpu_capability()} "
        f"(ATEN_CPU_CAPABILITY={env['ATEN_CPU_CAPABILITY']})",
        f"oneDNN ISA: {onednn_isa()} (ONEDNN_MAX_CPU_ISA={env['ONEDNN_MAX_CPU_ISA']}); oneDNN native bf16: "
        f"{onednn_bf16}",
        f"bf16 instructions in /proc/cpuinfo: {'/'.join(hardware.native_bf16(flags)) or 'none'}; "
        f"cutmix_pl chooses here (from /proc/cpuinfo): precision {choice.precision}, channels-last "
        f"{str(choice.channels_last).lower()}",
    ]


def compare_settings(args: argparse.Namespace, device: torch.device, dm: CIFAR10DataModule, split: cifar.Split
                     ) -> dict[str, float]:
    """``--settings``: the fixed-batch step in each setting, round-robin, from the same initial weights."""
    base = ResNet(args.depth)
    steps = {}
    for name in args.settings:
        precision, channels_last = SETTINGS[name]
        model = copy.deepcopy(base).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        net = torch.compile(model) if args.compile else model
        steps[name] = make_step(net, device, precision, channels_last)
    source = ceiling(split, args.batch_size, device, dm)  # one batch, made once, for all
    for step in steps.values():
        timed(step, source, args.warmup, device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(args.rounds):  # round-robin, the order turned each round: load drifts and order hit all alike
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(steps[name], source, args.steps, device))
    ips = {k: args.batch_size * args.steps / statistics.median(v) for k, v in times.items()}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; ResNet-{args.depth}, batch {args.batch_size}, fixed batch (c), compile {args.compile}; "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps (after {args.warmup} warm-up steps)")
    if device.type == "cpu":
        print("\n".join(cpu_report()))
    ref = ips.get("fp32-nchw")
    print(f"{'setting':10s} {'img/s':>9s} {'vs fp32-nchw':>13s}  rounds (img/s)")
    for k, v in ips.items():
        ratio = f"{v / ref:.2f}x" if ref else "-"
        rounds = ", ".join(f"{args.batch_size * args.steps / t:.0f}" for t in times[k])
        print(f"{k:10s} {v:9.0f} {ratio:>13s}  {rounds}")
    ratios = {f"{a}/{b}": ips[a] / ips[b] for a in ips for b in ips if a != b}
    for key in ("fp32-cl/fp32-nchw", "fp32-cl/bf16-nchw", "fp32-nchw/bf16-nchw", "fp32-cl/bf16-cl"):
        if key in ratios:
            print(f"ratio {key} = {ratios[key]:.2f}")
    return {**ratios, **ips}


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
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=None, metavar="SETTING",
                   help="time the fixed-batch step (c) in these settings instead of the three pipelines: "
                        f"{', '.join(SETTINGS)} (precision, memory format)")
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
    if args.settings:
        return compare_settings(args, device, dm, split)

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

"""Training throughput of the CLI with 1 and with N DDP processes, same global batch, interleaved runs.

    python scripts/ddp_throughput.py --data-dir data --procs 1 2 1x1 --rounds 3 --batches 20 --warmup 3
    python scripts/ddp_throughput.py --data-dir data --accelerator gpu --procs 1 2 --batch-size 512

Each run is a real ``python -m cutmix_pl fit`` (default recipe: ResNet-20, per-sample CutMix), in a
temporary folder, for ``--warmup + --batches`` training batches and no validation. A callback timed on rank 0
(``Throughput``, below; the script puts its own folder on PYTHONPATH) measures the ``--batches`` training steps
after the warm-up, so start-up, data loading and checkpointing are left out. Runs are interleaved (1, 2, 1, 2, ...)
and the median of ``--rounds`` is reported. Threads: ``--threads`` in all (default: the CPU count) are shared
out, so each of P processes gets OMP_NUM_THREADS = threads // P (torch sizes its intra-op pool by it); a
setting written PxT gives each of P processes T threads instead (1x1: one process on one thread).

On GPUs (``--accelerator gpu``) P processes take P GPUs over NCCL (configs/ddp.yaml); where P exceeds the GPUs
present, they share the first one over gloo (``SharedDeviceDDP``, below: Lightning refuses a device list with
repeats, and NCCL two ranks on one GPU, but DDPStrategy takes one device per rank as ``parallel_devices``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from cutmix_pl.cli import CONFIG_DIR

HERE = Path(__file__).resolve().parent


class SharedDeviceDDP(DDPStrategy):
    """DDP with ``processes`` ranks on the same ``device`` (e.g. two on cuda:0), over ``process_group_backend``."""

    def __init__(self, device: str = "cuda:0", processes: int = 2, process_group_backend: str = "gloo") -> None:
        super().__init__(parallel_devices=[torch.device(device)] * processes,
                         process_group_backend=process_group_backend)


class Throughput(L.Callback):
    """Rank 0 times training batches ``warmup`` .. the last one and writes images/second to ``out``."""

    def __init__(self, out: str, warmup: int = 5, global_batch: int = 128) -> None:
        self.out, self.warmup, self.global_batch = out, warmup, global_batch
        self.t0: float | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self.t0 is not None:
            self.steps += 1
            self.t1 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.is_global_zero and self.t0 is not None:
            seconds = self.t1 - self.t0
            Path(self.out).write_text(json.dumps({
                "steps": self.steps, "seconds": seconds, "world_size": trainer.world_size,
                "threads_per_process": int(os.environ.get("OMP_NUM_THREADS", "0")),
                "images_per_second": self.steps * self.global_batch / seconds}))


def placement(procs: int, accelerator: str) -> list[str]:
    """The flags that put ``procs`` processes on the devices: one device alone, DDP over devices, or shared."""
    if procs == 1:
        return ["--trainer.accelerator", accelerator, "--trainer.devices", "1"]
    if accelerator == "gpu" and procs > torch.cuda.device_count():
        return ["--trainer.accelerator", "gpu", "--trainer.strategy", "ddp_throughput.SharedDeviceDDP",
                "--trainer.strategy.processes", str(procs)]
    return ["--config", str(CONFIG_DIR / "ddp.yaml"), "--trainer.accelerator", accelerator,
            "--trainer.devices", str(procs)]


def run_once(procs: int, args: argparse.Namespace, threads: int, extra: list[str]) -> dict:
    """One CLI fit with ``procs`` processes of ``threads`` threads each; the Throughput callback's numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "throughput.json"
        cmd = [sys.executable, "-m", "cutmix_pl", "fit", *placement(procs, args.accelerator),
               "--data.data_dir", str(Path(args.data_dir).resolve()), "--data.download", "false",
               "--data.batch_size", str(args.batch_size),
               "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(args.warmup + args.batches),
               "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               "--trainer.callbacks+=ddp_throughput.Throughput", "--trainer.callbacks.out", str(out),
               "--trainer.callbacks.warmup", str(args.warmup),
               "--trainer.callbacks.global_batch", str(args.batch_size), *extra]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            sys.exit(f"run with {procs} process(es) failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict[tuple[int, int], list[float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    parser.add_argument("--procs", nargs="+", default=["1", "2"],
                        help="settings to compare: P (P processes sharing --threads) or PxT (T threads each)")
    parser.add_argument("--batch-size", type=int, default=128, help="GLOBAL batch, the same for every count")
    parser.add_argument("--batches", type=int, default=40, help="timed training batches per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training batches first")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is shown")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads shared by the processes")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    args, extra = parser.parse_known_args(argv)  # anything else goes to every fit, e.g. --trainer.precision

    settings = []
    for spec in args.procs:
        p, _, t = spec.partition("x")
        settings.append((int(p), int(t) if t else max(1, args.threads // int(p))))
    results: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for p, t in settings:
            res = run_once(p, args, t, extra)
            results[p, t].append(res["images_per_second"])
            print(f"round {r + 1}: {p} process(es) x {t} thread(s): "
                  f"{res['images_per_second']:.1f} images/s ({res['steps']} steps in {res['seconds']:.1f} s)",
                  flush=True)
    base = statistics.median(results[settings[0]])
    print(f"\nglobal batch {args.batch_size}, {args.batches} timed steps after {args.warmup}, "
          f"median of {args.rounds}, {args.accelerator}, {os.cpu_count()} CPUs")
    print("| processes | threads each | images/s (median) | runs | vs first |")
    print("|---|---|---|---|---|")
    for p, t in settings:
        med = statistics.median(results[p, t])
        runs = ", ".join(f"{v:.0f}" for v in results[p, t])
        print(f"| {p} | {t} | {med:.1f} | {runs} | {med / base:.2f}x |")
    return results


if __name__ == "__main__":
    main()

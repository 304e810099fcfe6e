"""Every GPU measurement the docs need, in one command of at most 9 minutes on one H100, into one folder.

    python scripts/gpu_suite.py --data-dir data --work /tmp/suite   # on the GPU machine; --out defaults to $OUT
    python scripts/gpu_suite.py --steps sweep --work /tmp/suite     # a later call on the same machine: the sweep
    python scripts/gpu_suite.py --smoke                             # the same code paths at toy size, CPU, < 3 min

The steps, in order of what the open goals need most; each is a subprocess with its own time limit (at the limit
it gets SIGTERM, then SIGKILL after a grace period), its own log, and a status; a failing step is recorded and the
suite goes on:

  env            torch / Lightning / jsonargparse versions, the device (torch.cuda.get_device_name), the date
  data           CIFAR-10 in --data-dir: found, or made by --make-data SCRIPT (make_cifar10.py); smoke: a tiny
                 synthetic set made by the tests' own helper (tests/conftest.py, cutmix_pl.cifar.write_batches)
  engine200      the 200-epoch CutMix run of configs/fast.yaml on the static-shape engine (sweep.py --engine
                 graphs, the grid's first run, alone), start to exit with a warm compile cache, then tested; before
                 it, a 1-epoch fit of the same settings with an empty cache (the cold start; no test, which would
                 compile the network once more for nothing: sweep.py --no-test). Its run folder is the
                 sweep's, so the sweep counts it (smoke: 2 tiny epochs, drop_last alone, nothing compiled)
  pytest         ``pytest -m cuda`` with a JUnit XML report (on a CPU the cuda tests are collected and skipped)
  bench_augment  scripts/bench_augment.py on the device
  bench_train    scripts/bench_train.py on the device
  bench_fit      scripts/bench_fit.py --events: ``fit`` training img/s at batch 512 (bf16, channels-last): eager,
                 the transform compiled, and the static-shape engine (CUDA graphs of the network, drop_last, the
                 transform compiled); the eager fit against bench_train's fixed-batch step (smoke: eager only)
  ddp            a 2-process DDP fit with BOTH ranks on cuda:0, over gloo (smoke: 2 CPU processes over gloo);
                 each rank reports its device, backend and a parameter checksum, which must agree
  bench_randaugment  scripts/bench_randaugment.py on the device (ours per image against torchvision and kornia)
  throughput     scripts/sweep.py --throughput: one short fit alone, then --parallel K at once; the ratio
  sweep          scripts/sweep.py --grid gpu-results --parallel K --reuse, with --budget-minutes set to what is left
                 and --speedup set to the measured ratio (smoke: --grid smoke); on the engine when engine200's run
                 finished (--engine auto), its estimates scaled by that run's measured minutes plus its cold start;
                 runs listed as done in docs/sweeps/*.csv (earlier GPU leases, same configs and flags) are not run
                 again (--prior)

It ends by printing a summary table (step, status, time, key figures, files) and writing it to summary.md, with the
environment. Exit status 0 only if every step asked for passed.

Two ranks on one GPU: Lightning refuses a device list with repeats (``--trainer.devices [0,0]``: "Device ID's
(GPU) must be unique") and NCCL refuses two ranks on one GPU, but ``DDPStrategy`` accepts ``parallel_devices``,
one device per local rank, and Lightning then launches one process per entry. jsonargparse cannot build
``torch.device`` objects from a config, so ``SharedDeviceDDP`` below takes a device string and a process count
and passes ``[device] * processes`` on; the processes talk over gloo, which handles CUDA tensors. It is used as
``--trainer.strategy gpu_suite.SharedDeviceDDP`` with this folder on PYTHONPATH, so no torchrun and no
CUDA_VISIBLE_DEVICES trick is needed (``torchrun --nproc_per_node 2`` with the same class works too: tried on 2
CPU processes; then torchrun launches the ranks and Lightning checks that their number matches).

On the device machine: jsonargparse is not installed there (carry its wheel and put it on PYTHONPATH; the env
step fails and names it when it is missing); CIFAR-10 must be made there (carry ../shared/data, pass
--make-data .../make_cifar10.py). The step limits are caps (a --minutes above the default stretches them in
proportion, for a slow or busy machine), and together they exceed 9 minutes: what a first call
leaves undone, a second call on the still-warm machine takes up (``--steps ...`` with the same ``--work``, outside
$OUT, so that the runs and the compile cache stay): the sweep resumes its runs, with the engine, the throughput ratio
and the engine's scale that the first call measured (``suite/state.json`` in --work). A lease's grid goes on in the
next lease: copy its results.csv to docs/sweeps/<date>-<device>.csv, which the next suite reads (``--prior``).

Checked without a GPU: the smoke mode runs every step with CPU flags (tests/test_sweep.py), and
tests/test_gpu_commands.py parses every command of the GPU mode (each script's flags, each fit's configuration)
without running it.

The folder: the device machine returns at most 8 files from $OUT, and none deeper than $OUT/a/b/file, so the top of
--out holds only summary.md, suite.json, results.md, results.csv, val_acc.png, throughput.md and logs.tar.gz (every
step's log, the JUnit XML, the benchmark JSON, the runs' small files; no checkpoints, no data). Everything else is in
--work (default <out>/work/steps, deep enough to stay behind); point --work outside $OUT to keep the sweep's runs
between two calls on a warm machine (the sweep always runs with --reuse and resumes them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

STARTED = time.monotonic()  # the suite's time counts from here, before the slow imports below
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # cutmix_pl from the checkout, also where it is not installed (the device machine)
STEPS = ("env", "data", "engine200", "pytest", "bench_augment", "bench_train", "bench_fit", "ddp", "bench_randaugment",
         "throughput", "sweep")
# Seconds per step: (on the GPU, in --smoke), for the default --minutes (MINUTES); a longer --minutes stretches them
# in proportion (a slow or busy machine), and each is clipped to what is left of --minutes. The sweep gets the
# rest. The GPU limits are generous guesses (a few of these steps have never run on a GPU): a step that needs less
# leaves the difference to the sweep.
LIMITS = {"env": (60, 45), "data": (90, 30), "engine200": (240, 60), "pytest": (150, 60), "ddp": (120, 60),
          "bench_augment": (90, 40), "bench_randaugment": (45, 40), "bench_train": (90, 45), "bench_fit": (180, 40),
          "throughput": (120, 75)}
STATE = "suite/state.json"  # in --work (a folder down: only deliverables come back): for a later call
# smoke: the engine's code path without compiling (a CPU compiles for longer than the smoke suite may take)
ENGINE_SMOKE_FLAGS = ["--model.compile", "false", "--data.compile_transform", "false"]
MINUTES = (9.0, 3.0)  # the whole suite's default time (on the GPU, in --smoke)
SUMMARY_RESERVE = (20, 5)  # seconds kept for the summary and the archive (GPU: many logs; smoke)
GRACE = (30, 10)  # seconds between SIGTERM and SIGKILL at a step's limit: a fit saves last.ckpt in it
ARCHIVE_LIMIT = 15 * 2**20  # the device machine returns files up to 16 MiB
# Run in a subprocess, so that the suite itself never opens a CUDA context (it would hold GPU memory throughout).
ENV_PROBE = """
import json, os, platform, socket, sys, time
from importlib.metadata import PackageNotFoundError, version
import torch
try:
    jap = version("jsonargparse")
except PackageNotFoundError:
    jap = "MISSING (carry it as a wheel)"
cuda = torch.cuda.is_available()
info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__, "lightning": version("lightning"), "jsonargparse": jap, "cuda": torch.version.cuda,
        "cuda_available": cuda, "device": torch.cuda.get_device_name(0) if cuda else "CPU",
        "gpus": torch.cuda.device_count(), "cpus": os.cpu_count()}
open(sys.argv[1], "w").write(json.dumps(info))
print(info)
"""


# -- used inside the DDP smoke run (imported from the CLI's processes through PYTHONPATH) -------------------------
class SharedDeviceDDP(DDPStrategy):
    """DDP with ``processes`` ranks on the same ``device`` (e.g. two on cuda:0), over ``process_group_backend``."""

    def __init__(self, device: str = "cuda:0", processes: int = 2, process_group_backend: str = "gloo") -> None:
        super().__init__(parallel_devices=[torch.device(device)] * processes,
                         process_group_backend=process_group_backend)


class DeviceReport(L.Callback):
    """Each rank writes ``<out>/rank<r>.json``: its device, the world size, the backend, and at the end of training
    a checksum of the parameters (DDP keeps them identical on every rank, so the checksums must be equal)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.info: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dist = torch.distributed
        device = pl_module.device
        self.info = {"rank": trainer.global_rank, "world_size": trainer.world_size, "device": str(device),
                     "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
                     "pid": os.getpid()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            total = sum(p.detach().double().sum().item() for p in pl_module.parameters())
        self.info.update(global_step=trainer.global_step, param_checksum=total)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.info))


# -- steps ----------------------------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    status: str = "not run"  # passed, failed (why), timed out, skipped (why)
    seconds: float = 0.0
    limit: float = 0.0
    started: float = 0.0
    figures: str = ""
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "passed" or self.status.startswith("skipped")


class Suite:
    """Runs the steps in order, each within its time limit, and writes the summary."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.start = STARTED
        self.deadline = self.start + 60 * args.minutes
        self.stretch = max(1.0, args.minutes / MINUTES[self.smoke])  # of every step's limit
        self.out: Path = args.out
        self.work: Path = args.work
        self.steps: dict[str, Step] = {}
        self.env_info: dict[str, Any] = {}
        self.data_dir: Path | None = None
        self.speedup: float | None = None
        self.fixed_batch: float | None = None  # img/s of bench_train's fixed-batch step
        self.engine = args.engine  # the sweep's engine: auto until engine200 settles it
        self.engine_scale: float | None = None  # engine200's measured minutes over the preset's
        self.inductor = self.work / "inductor"  # the engine's compile cache, shared with the sweep; never packed
        self.load_state()

    # - what an earlier call on this machine measured (same --work) -
    def load_state(self) -> None:
        path = self.work / STATE
        state = json.loads(path.read_text()) if path.is_file() else {}
        self.speedup, self.fixed_batch = state.get("speedup"), state.get("fixed_batch")
        self.engine_scale = state.get("engine_scale")
        if self.engine == "auto" and state.get("engine") in ("eager", "graphs"):
            self.engine = state["engine"]

    def save_state(self) -> None:
        state = {"speedup": self.speedup, "fixed_batch": self.fixed_batch, "engine": self.engine,
                 "engine_scale": self.engine_scale}
        (self.work / STATE).parent.mkdir(parents=True, exist_ok=True)
        (self.work / STATE).write_text(json.dumps(state))

    # - plumbing -
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def folder(self, step: str) -> Path:
        path = self.work / step
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self, **more: str) -> dict[str, str]:
        """Subprocesses find cutmix_pl (the checkout, installed or not) and this folder's modules."""
        path = os.pathsep.join(filter(None, [str(REPO), str(HERE), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", **more)
        if self.smoke:
            env["OMP_NUM_THREADS"] = "1"  # a shared CPU: one thread a process keeps the toy runs from fighting
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
            env.pop(key, None)  # a DDP launch of our own must not inherit another's
        return env

    def call(self, step: Step, cmd: list[str], **env: str) -> int | None:
        """Run ``cmd`` in its own process group, logging into the step's folder, stopped at the step's limit.
        ``env``: variables to add. The return code, or None when it was stopped."""
        log = self.folder(step.name) / f"{step.name}.log"
        grace = GRACE[self.smoke]
        remaining = step.limit - (time.monotonic() - step.started)
        with log.open("a") as f:
            print(f"+ {' '.join(cmd)}", file=f, flush=True)
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(**env), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=max(remaining - grace, 1))
            except subprocess.TimeoutExpired:
                rc = None
                self._stop(proc, grace)
                print(f"gpu_suite: stopped at the step's limit of {step.limit:.0f} s", file=f)
        if str(log) not in step.files:
            step.files.append(str(log))
        return rc

    @staticmethod
    def _stop(proc: subprocess.Popen, grace: float) -> None:
        """SIGTERM to the whole group (fits save last.ckpt and stop), SIGKILL after ``grace`` seconds."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def python_call(self, step: Step, script: str, result: Path, argv: list[str]) -> tuple[int | None, Any]:
        """``main(argv)`` of scripts/<script>.py in a subprocess (scripts/ is on its PYTHONPATH); its return value,
        saved as JSON in ``result``."""
        result.unlink(missing_ok=True)
        code = (f"import json, sys; from {script} import main; "
                "json.dump(main(sys.argv[2:]), open(sys.argv[1], 'w'), default=str)")
        rc = self.call(step, [sys.executable, "-c", code, str(result), *argv])
        return rc, json.loads(result.read_text()) if rc == 0 and result.is_file() else None

    def run(self, name: str, func: Any) -> Step:
        """One step: its limit (clipped by what is left of the suite), then ``func(step)``, which sets the status."""
        step = Step(name)
        self.steps[name] = step
        if name not in self.args.steps:
            step.status = "skipped (not asked)"
            return step
        left = self.left() - SUMMARY_RESERVE[self.smoke]
        step.limit = left if name == "sweep" else min(LIMITS[name][self.smoke] * self.stretch, left)
        if step.limit < 5:
            step.status = "failed (no time left)"
            return step
        print(f"gpu_suite: {name} (limit {step.limit:.0f} s) ...", flush=True)
        step.started = time.monotonic()
        try:
            func(step)
        except Exception as err:  # a bug or a surprise in one step must not end the suite
            step.status = f"failed ({type(err).__name__}: {err})"
        self.save_state()
        step.seconds = time.monotonic() - step.started
        print(f"gpu_suite: {name}: {step.status} in {step.seconds:.0f} s{'; ' + step.figures if step.figures else ''}",
              flush=True)
        return step

    @staticmethod
    def settle(step: Step, rc: int | None, problem: str | None = None) -> None:
        """The step's status from its (last) process's return code and what its checks found wrong, if anything."""
        step.status = ("timed out" if rc is None else f"failed (exit {rc})" if rc != 0
                       else f"failed ({problem})" if problem else "passed")

    # - env -
    def step_env(self, step: Step) -> None:
        out = self.folder("env") / "env.json"
        rc = self.call(step, [sys.executable, "-c", ENV_PROBE, str(out)])
        if rc == 0:
            self.env_info = json.loads(out.read_text())
            self.env_info["commit"] = git_commit()
            self.env_info["smoke"] = self.smoke
        needs_gpu = not self.smoke and not self.env_info.get("cuda_available")
        missing = str(self.env_info.get("jsonargparse", "")).startswith("MISSING")
        self.settle(step, rc, "no CUDA device" if needs_gpu else "jsonargparse is missing" if missing else None)
        if rc == 0:
            step.figures = (f"{self.env_info['device']}; torch {self.env_info['torch']}, Lightning "
                            f"{self.env_info['lightning']}, jsonargparse {self.env_info['jsonargparse']}")
            if needs_gpu:
                step.figures += "; no CUDA device (use --smoke on a CPU)"

    # - data -
    def step_data(self, step: Step) -> None:
        from cutmix_pl import cifar

        if self.smoke:  # the tests' helper: a learnable tiny set (a colour per class plus noise), in a second
            root = self.folder("data") / "tiny"
            if cifar.find(root) is None:
                load_module("conftest", REPO / "tests" / "conftest.py").make_tiny_cifar(root)
            self.data_dir = root
            step.status, step.figures = "passed", f"tiny synthetic CIFAR-10 (640 train, 200 test) in {root}"
            return
        root = self.args.data_dir.resolve()
        if cifar.find(root) is None:
            script = self.args.make_data or next((p for p in (REPO / "shared" / "data" / "make_cifar10.py",
                                                              REPO.parent / "shared" / "data" / "make_cifar10.py")
                                                  if p.is_file()), None)
            if script is None:
                step.status = f"failed (no CIFAR-10 in {root} and no --make-data script)"
                return
            rc = self.call(step, [sys.executable, str(script), "--out", str(root)])
            if rc != 0 or cifar.find(root) is None:
                self.settle(step, rc, f"{script} made no CIFAR-10 in {root}")
                return
        train, test = cifar.load(root)
        self.data_dir = root
        step.status = "passed"
        step.figures = f"CIFAR-10 in {root}: {len(train.labels)} train, {len(test.labels)} test images"

    def need_data(self, step: Step) -> bool:
        if self.data_dir is None:
            step.status = "failed (no data: see the data step)"
        return self.data_dir is not None

    # - pytest -
    def step_pytest(self, step: Step) -> None:
        junit = self.folder("pytest") / "junit.xml"
        junit.unlink(missing_ok=True)
        rc = self.call(step, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                              f"--junitxml={junit}", "tests"])
        counts = junit_counts(junit) if junit.is_file() else None
        if counts:
            step.files.append(str(junit))
            step.figures = (f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
                            f"{counts['skipped']} skipped (of {counts['tests']} cuda tests)")
        # smoke: without CUDA every cuda test must be skipped; on the GPU some must have run
        problem = ("no JUnit report" if counts is None
                   else "no cuda test ran" if not self.smoke and counts["passed"] == 0
                   else "a cuda test ran without CUDA" if self.smoke and counts["tests"] != counts["skipped"] else None)
        self.settle(step, rc, problem)

    # - ddp -
    def step_ddp(self, step: Step) -> None:
        if not self.need_data(step):
            return
        folder = self.folder("ddp")
        report = folder / "report"
        shutil.rmtree(report, ignore_errors=True)
        shutil.rmtree(folder / "runs", ignore_errors=True)
        device = "cpu" if self.smoke else "cuda:0"
        size = (["--data.val_size", "100", "--data.batch_size", "32", "--data.eval_batch_size", "100",
                 "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"] if self.smoke else
                ["--data.batch_size", "256", "--trainer.limit_train_batches", "20", "--trainer.limit_val_batches", "2"])
        cmd = [sys.executable, "-m", "cutmix_pl", "fit", "--config", str(REPO / "cutmix_pl" / "configs" / "smoke.yaml"),
               "--trainer.accelerator", "cpu" if self.smoke else "gpu",
               "--trainer.strategy", "gpu_suite.SharedDeviceDDP", "--trainer.strategy.device", device,
               "--trainer.strategy.processes", "2", "--trainer.strategy.process_group_backend", "gloo",
               "--trainer.callbacks+=gpu_suite.DeviceReport", "--trainer.callbacks.out", str(report),
               "--data.data_dir", str(self.data_dir), "--data.download", "false", "--trainer.max_epochs", "1",
               "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(folder / "runs"),
               *size]
        rc = self.call(step, cmd)
        ranks = [json.loads(p.read_text()) for p in sorted(report.glob("rank*.json"))]
        finished = any((folder / "runs").glob("smoke/version_*/FINISHED"))
        self.settle(step, rc, ddp_problem(ranks, device, finished))
        if ranks:
            step.figures = (f"{len(ranks)} ranks (pids {', '.join(str(r['pid']) for r in ranks)}) on "
                            f"{', '.join(sorted({r['device'] for r in ranks}))} ({ranks[0]['device_name']}), backend "
                            f"{ranks[0]['backend']}, {ranks[0]['global_step']} steps, parameters "
                            f"{'identical' if len({r['param_checksum'] for r in ranks}) == 1 else 'DIFFERENT'} "
                            f"across ranks; run finished: {finished}")

    # - benchmarks -
    def bench(self, step: Step, script: str, argv: list[str]) -> Any:
        """Rows of scripts/<script>.py's ``main(argv)``, kept as <script>.json among the step's files."""
        result = self.folder(step.name) / f"{script}.json"
        rc, rows = self.python_call(step, script, result, argv)
        self.settle(step, rc, None if rows else "no results")
        if rows:
            step.files.append(str(result))
        return rows

    def step_bench_augment(self, step: Step) -> None:
        argv = (["--devices", "cpu", "--batch-sizes", "64", "--reps", "1", "--min-time", "0"] if self.smoke else
                ["--devices", "cuda", "--reps", "11", "--min-time", "0.1", "--compile"])
        rows = self.bench(step, "bench_augment", argv)
        if rows:
            top = max(r["batch"] for r in rows)
            ours = next(r for r in rows if r["batch"] == top and r["method"] == "ours CutMix elem")
            ratios = ", ".join(f"{ours[k]:.2f}x {label}" for k, label in (("vs_torchvision", "torchvision"),
                                                                             ("vs_timm_elem", "timm elem"))
                               if ours.get(k) is not None)
            step.figures = f"batch {top} on {ours['device']}: ours elem {ours['img_per_s']:,.0f} img/s ({ratios})"
            fused = next((r for r in rows if r["batch"] == top and r["method"] == "ours CutMix elem compiled"), None)
            if fused is not None:
                step.figures += f"; compiled {fused['img_per_s']:,.0f} img/s ({fused['vs_torchvision']:.2f}x torchvision)"

    def step_bench_randaugment(self, step: Step) -> None:
        argv = (["--devices", "cpu", "--batch-sizes", "32", "--reps", "1", "--min-time", "0", "--workers", "0"]
                if self.smoke else ["--devices", "cuda", "--batch-sizes", "128", "512", "--reps", "5", "--min-time", "0.2",
                                    "--workers", "0"])
        rows = self.bench(step, "bench_randaugment", argv)
        if rows:
            top = max(r["batch"] for r in rows)
            ours = next(r for r in rows if r["batch"] == top and r["method"] == "ours per image")
            step.figures = (f"batch {top} on {ours['device']}: ours per image {ours['img_per_s']:,.0f} img/s "
                            f"({ours['vs_base']:.2f}x torchvision per image)")

    def step_bench_train(self, step: Step) -> None:
        if not self.need_data(step):
            return
        argv = (["--data-dir", str(self.data_dir), "--device", "cpu", "--steps", "1", "--rounds", "1", "--warmup", "1",
                 "--workers", "0", "--batch-size", "32"] if self.smoke else
                ["--data-dir", str(self.data_dir), "--device", "cuda", "--batch-size", "512", "--steps", "50",
                 "--rounds", "5", "--warmup", "10", "--workers", str(min(16, os.cpu_count() or 1))])
        result = self.folder(step.name) / "bench_train.json"
        rc, res = self.python_call(step, "bench_train", result, argv)
        self.settle(step, rc, None if res else "no results")
        if res:
            step.files.append(str(result))
            rates = [v for k, v in res.items() if "/" not in k]
            self.fixed_batch = rates[-1]  # (c): the training step alone, on one batch already on the device
            step.figures = ("a, b, c: " + ", ".join(f"{v:,.0f}" for v in rates)
                            + f" img/s; a/b {res['a/b']:.2f}, a/c {res['a/c']:.2f}")

    def step_bench_fit(self, step: Step) -> None:
        if not self.need_data(step):
            return
        # bench_train's settings (batch 512, bf16, channels-last, no torch.compile of the network), so that the
        # eager fit compares with its fixed-batch step
        settings = ("--trainer.accelerator cpu --trainer.precision 32-true --model.channels_last false" if self.smoke
                    else "--trainer.accelerator gpu --trainer.precision bf16-mixed --model.channels_last true")
        base = f"{REPO}::{settings}"
        # the transform compiled; then the static-shape engine: the network's forward and backward as CUDA graphs
        # (torch.compile mode reduce-overhead), every batch one shape, the transform compiled. Smoke: the eager
        # variant only (compiling takes a CPU longer than the whole step may).
        variants = [base] if self.smoke else [
            base, f"{base} --data.compile_transform true", f"{base} {' '.join(sweep_module().ENGINE)}"]
        argv = [*variants, "--events", "--data-dir", str(self.data_dir), "--model.log_images", "false"]
        argv += (["--batch-size", "16", "--short", "5", "--long", "30", "--reps", "1", "--data.val_size", "100"]
                 if self.smoke else
                 ["--batch-size", "512", "--short", "20", "--long", "80", "--reps", "1"])
        result = self.folder(step.name) / "bench_fit.json"
        rc, res = self.python_call(step, "bench_fit", result, argv)
        self.settle(step, rc, None if res else "no results")
        if res:
            step.files.append(str(result))
            eager, *faster = res.values()
            step.figures = f"fit {eager:,.0f} img/s" + "".join(
                f"; {name} {rate:,.0f} img/s ({rate / eager:.2f}x)"
                for name, rate in zip(("compiled transform", "graphs"), faster))
            if self.fixed_batch:
                step.figures += f"; fit / fixed-batch step {eager / self.fixed_batch:.2f}"

    # - the engine's 200-epoch run, and the sweep -
    def sweep_base(self, out: Path, parallel: int | None = None) -> list[str]:
        return [sys.executable, str(HERE / "sweep.py"), "--data-dir", str(self.data_dir), "--out", str(out),
                "--parallel", str(parallel or self.args.parallel), "--quiet",
                *(["--threads", "1"] if self.smoke else [])]

    def choose_engine(self, ran: bool) -> None:
        """`--engine auto` takes the engine for the sweep only where its 200-epoch run finished in this suite."""
        if self.engine == "auto":
            self.engine = "graphs" if ran else "eager"

    def step_engine200(self, step: Step) -> None:
        if not self.need_data(step):
            return
        sweep = sweep_module()
        grid = "smoke" if self.smoke else self.args.grid
        run = sweep.with_engine(sweep.PRESETS[grid])[0]  # gpu-results: fast.yaml, 200 epochs, CutMix, seed 0
        what = ["--grid", grid, "--engine", "graphs", "--only", run.name, *(ENGINE_SMOKE_FLAGS if self.smoke else [])]
        shutil.rmtree(self.inductor, ignore_errors=True)  # the probe starts with nothing compiled
        cache = {"TORCHINDUCTOR_CACHE_DIR": str(self.inductor)}
        probe_out = self.folder("engine200") / "probe"
        shutil.rmtree(probe_out, ignore_errors=True)
        # the probe's fit alone: its test would compile the network again, on the GPU's time, for nothing
        rc = self.call(step, [*self.sweep_base(probe_out, 1), *what, "--trainer.max_epochs", "1", "--no-test"],
                       **cache)
        probe = read_csv(probe_out / "results.csv")
        if rc != 0 or not probe or not probe[0]["status"].startswith("done"):
            self.settle(step, rc, "the 1-epoch probe did not finish")
            self.choose_engine(ran=False)
            return
        out = self.folder("sweep")
        (out / "results.csv").unlink(missing_ok=True)  # an earlier call's table must not pass for this run's
        rc = self.call(step, [*self.sweep_base(out, 1), *what, "--reuse"], **cache)
        row = next((r for r in read_csv(out / "results.csv") if r["name"] == run.name), None)
        done = row is not None and row["status"].startswith("done")
        self.settle(step, rc, None if done else "the run did not finish")
        self.choose_engine(ran=done)
        step.files.append(str(out / "results.csv"))
        step.figures = f"cold start: a 1-epoch fit {60 * float(probe[0]['fit_minutes']):.0f} s start to exit"
        if done:
            # the sweep's first estimates: this run's minutes plus a cold start's (the probe's), on the safe side
            minutes = sweep.ledger_minutes(out, run.name) + sweep.ledger_minutes(probe_out, run.name)
            self.engine_scale = minutes / run.minutes
            step.figures += (f"; {run.name}: fit {60 * float(row['fit_minutes']):.0f} s start to exit (warm cache), "
                             f"{float(row['images_per_s']):,.0f} img/s, test acc {float(row['test_acc']):.2%}")
        elif row is not None and row["images_per_s"]:  # stopped at the limit: its speed still says what it would take
            step.figures += f"; {run.name} {row['status']}: {float(row['images_per_s']):,.0f} img/s while it ran"

    def step_throughput(self, step: Step) -> None:
        if not self.need_data(step):
            return
        out = self.folder("throughput")
        (out / "throughput.json").unlink(missing_ok=True)
        # the default recipe (batch 128, no compile): no compilation to wait for, and the launch-bound case where
        # sharing the card should gain most
        what = (["--grid", "smoke", "--throughput-steps", "12"] if self.smoke else
                ["--grid", "gpu-results", "--throughput-setting", "b128-200ep", "--throughput-steps", "800"])
        rc = self.call(step, [*self.sweep_base(out), "--throughput", *what])
        res = json.loads((out / "throughput.json").read_text()) if (out / "throughput.json").is_file() else None
        self.settle(step, rc, None if res and res.get("ratio") else "no ratio measured")
        if res and res.get("ratio"):
            k = res["processes"]
            self.speedup = res["ratio"]
            step.files.append(str(out / "throughput.md"))
            step.figures = (f"{res['setting']}: 1 alone {res['alone']['each'][0]:,.0f} img/s; {k} at once "
                            f"{res[f'x{k}']['all']:,.0f} img/s in all; ratio {res['ratio']:.2f}")

    def step_sweep(self, step: Step) -> None:
        if not self.need_data(step):
            return
        out = self.folder("sweep")
        (out / "results.csv").unlink(missing_ok=True)  # a table left by an earlier call must not pass for this one's
        grace = GRACE[self.smoke]
        # launch only runs whose estimate ends before SIGTERM comes; the margin covers the last test and the table
        budget = (step.limit - grace - (10 if self.smoke else 45)) / 60
        engine = "graphs" if self.engine == "graphs" else "eager"
        graphs = ([*(ENGINE_SMOKE_FLAGS if self.smoke else []),
                   *(["--estimate-scale", f"{self.engine_scale:.3f}"] if self.engine_scale else [])]
                  if engine == "graphs" else [])
        prior = ["--prior", *map(str, self.args.prior)] if self.args.prior and not self.smoke else []
        cmd = [*self.sweep_base(out), "--grid", "smoke" if self.smoke else self.args.grid, "--reuse",
               "--engine", engine, *graphs, *prior, "--budget-minutes", f"{budget:.2f}",
               *(["--speedup", f"{self.speedup:.2f}"] if self.speedup else []), *self.args.sweep_flags]
        rc = self.call(step, cmd, TORCHINDUCTOR_CACHE_DIR=str(self.inductor))
        rows = read_csv(out / "results.csv")
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        done = sum(n for s, n in counts.items() if s.startswith("done"))
        bad = sum(n for s, n in counts.items() if s.startswith(("failed", "interrupted")))
        # the budget may leave runs out on the GPU; in smoke every run must have been done
        problem = ("no results table" if not rows else f"{bad} run(s) failed or interrupted" if bad
                   else f"only {done} of {len(rows)} runs done" if self.smoke and done < len(rows) else None)
        self.settle(step, rc, problem)
        if rows:
            step.files += [str(out / n) for n in ("results.md", "results.csv", "val_acc.png")]
            step.figures = (f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                            + f" (budget {budget:.1f} min, {self.args.parallel} at a time, {engine})")
            accs = [f"{r['name']} {float(r['test_acc']):.2%}" for r in rows if r["test_acc"]]
            if accs:
                step.figures += "; test acc: " + ", ".join(accs[:6]) + (" ..." if len(accs) > 6 else "")

    # - the end -
    def finish(self) -> bool:
        """Copy the deliverables to the top of --out, pack the logs, write and print the summary."""
        self.out.mkdir(parents=True, exist_ok=True)
        for src in (self.work / "sweep" / "results.md", self.work / "sweep" / "results.csv",
                    self.work / "sweep" / "val_acc.png", self.work / "throughput" / "throughput.md"):
            if src.is_file():
                shutil.copyfile(src, self.out / src.name)
        packed, left_out = pack_logs(self.work, self.out / "logs.tar.gz")
        (self.out / "summary.md").write_text("")  # listed among the files below
        ok = all(s.ok for s in self.steps.values())
        total = time.monotonic() - self.start
        text = summary_text(self, total, ok, packed, left_out)
        (self.out / "summary.md").write_text(text)
        (self.out / "suite.json").write_text(json.dumps({
            "ok": ok, "seconds": round(total, 1), "smoke": self.smoke, "env": self.env_info,
            "steps": [vars(s) | {"ok": s.ok} for s in self.steps.values()],
            "archive": {"packed": packed, "left_out": left_out}}, indent=1))
        print(text)
        return ok


# -- helpers --------------------------------------------------------------------------------------------------------
def ddp_problem(ranks: list[dict[str, Any]], device: str, finished: bool) -> str | None:
    """What is wrong with the DDP smoke run's rank reports, or None: two processes, both on ``device``, over gloo,
    with identical parameters at the end, and a finished run."""
    if [r["rank"] for r in ranks] != [0, 1] or any(r["world_size"] != 2 for r in ranks):
        return f"expected reports of ranks 0 and 1 of 2, got {[(r['rank'], r['world_size']) for r in ranks]}"
    if len({r["pid"] for r in ranks}) != 2:
        return "the two ranks ran in one process"
    if {r["device"] for r in ranks} != {device} or {r["backend"] for r in ranks} != {"gloo"}:
        return f"ranks on {[r['device'] for r in ranks]} over {[r['backend'] for r in ranks]}, not {device} over gloo"
    if len({r["param_checksum"] for r in ranks}) != 1:
        return "the ranks' parameters differ after training (gradients were not all-reduced)"
    return None if finished else "the run did not finish (no FINISHED file)"


def sweep_module() -> Any:
    """scripts/sweep.py (its grids, ENGINE, its ledger), loaded once."""
    return sys.modules.get("gpu_suite_sweep") or load_module("sweep", HERE / "sweep.py")


def load_module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"gpu_suite_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def junit_counts(path: Path) -> dict[str, int] | None:
    """Test counts of a pytest JUnit XML report."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def pack_logs(work: Path, archive: Path) -> tuple[int, list[str]]:
    """Pack the small files of ``work`` (logs, reports, configs, events; never checkpoints or data) into one
    archive of at most ARCHIVE_LIMIT bytes, smallest kinds first; what did not fit is listed."""
    def rank(p: Path) -> tuple[int, int]:
        kind = 1 if p.name.startswith("events.out.tfevents") else 0  # the event files go last: they are large
        return kind, p.stat().st_size

    files = sorted((p for p in work.rglob("*") if p.is_file() and p.suffix != ".ckpt" and ".lock" != p.name
                    and p.relative_to(work).parts[0] not in ("data", "inductor")), key=rank)
    total, packed, left_out = 0, 0, []
    with tarfile.open(archive, "w:gz") as tar:
        for p in files:
            size = p.stat().st_size
            if total + size > ARCHIVE_LIMIT:
                left_out.append(str(p.relative_to(work)))
                continue
            tar.add(p, arcname=str(p.relative_to(work)))
            total += size
            packed += 1
    return packed, left_out


def summary_text(suite: Suite, total: float, ok: bool, packed: int, left_out: list[str]) -> str:
    e = suite.env_info
    lines = [f"# GPU suite{' (smoke, CPU)' if suite.smoke else ''}: {'all steps passed' if ok else 'FAILED'}", "",
             f"{e.get('date', time.strftime('%Y-%m-%d %H:%M:%S'))}; {e.get('device', '?')}; "
             f"torch {e.get('torch', '?')}, "
             f"Lightning {e.get('lightning', '?')}, jsonargparse {e.get('jsonargparse', '?')}, Python "
             f"{e.get('python', '?')}, CUDA {e.get('cuda', '-')}; {e.get('cpus', '?')} CPUs; commit "
             f"{e.get('commit') or '?'}; {total:.0f} s in all (of {60 * suite.args.minutes:.0f}).", "",
             "| step | status | time (limit) | key figures |", "|---|---|---|---|"]
    for s in suite.steps.values():
        limit = f" ({s.limit:.0f})" if s.limit else ""
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} s{limit} | {s.figures.replace('|', '/')} |")
    top = sorted({p.name for p in suite.out.iterdir() if p.is_file()} | {"suite.json"})
    lines += ["", f"Files in {suite.out}/: {', '.join(top)} (logs.tar.gz: {packed} small files of the steps' folder"
              + (f", {len(left_out)} left out for size" if left_out else "") + f"); everything else in {suite.work}/."]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_suite_out"),
                   help="the results folder (default: $OUT if set, else gpu_suite_out)")
    p.add_argument("--work", type=Path, default=None, help="the steps' own files (default: <out>/work/steps)")
    p.add_argument("--smoke", action="store_true", help="toy sizes on a CPU, the same code paths (< 3 min)")
    p.add_argument("--minutes", type=float, default=None,
                   help=f"the whole suite's time (default: {MINUTES[0]:g}; smoke: {MINUTES[1]:g}); more stretches "
                   "every step's limit in proportion")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="CIFAR-10 (ignored by --smoke)")
    p.add_argument("--make-data", type=Path, default=None,
                   help="make_cifar10.py, run when --data-dir holds no CIFAR-10 (default: shared/data/ if there)")
    p.add_argument("--parallel", type=int, default=None, help="processes at once in the sweep (default: 4; smoke 2)")
    p.add_argument("--grid", default="gpu-results", help="the sweep's preset grid (smoke: always smoke)")
    p.add_argument("--engine", choices=("auto", "eager", "graphs"), default="auto",
                   help="the sweep's engine; auto: graphs if engine200's run finished in this call, else eager")
    p.add_argument("--prior", type=Path, nargs="*", default=sorted((REPO / "docs" / "sweeps").glob("*.csv")),
                   help="results.csv of earlier sweeps whose done runs the sweep takes over (default: "
                        "docs/sweeps/*.csv; ignored by --smoke)")
    p.add_argument("--sweep-flags", nargs=argparse.REMAINDER, default=[],
                   help="everything after it goes to every sweep run (e.g. --trainer.max_epochs 30); put it last")
    args = p.parse_args(argv)
    asked = {s.strip() for s in args.steps.split(",") if s.strip()}
    unknown = asked - set(STEPS)
    if unknown:
        p.error(f"--steps: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    asked.add("env")  # the summary always names the machine
    if asked & {"engine200", "ddp", "bench_train", "bench_fit", "throughput", "sweep"}:
        asked.add("data")  # they read the data set
    args.steps = [s for s in STEPS if s in asked]
    if args.minutes is not None and args.minutes <= 0:
        p.error(f"--minutes must be > 0, got {args.minutes:g}; fix: leave it out for {MINUTES[0]:g} "
                f"(smoke: {MINUTES[1]:g})")
    args.minutes = args.minutes or MINUTES[args.smoke]
    args.parallel = args.parallel or (2 if args.smoke else 4)
    args.out = args.out.resolve()
    args.work = (args.work or args.out / "work" / "steps").resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    suite = Suite(args)
    args.work.mkdir(parents=True, exist_ok=True)
    for name in STEPS:
        suite.run(name, getattr(suite, f"step_{name}"))
    return 0 if suite.finish() else 1


if __name__ == "__main__":
    sys.exit(main())

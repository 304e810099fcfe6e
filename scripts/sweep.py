"""A grid of CLI runs (methods x seeds x settings), K at a time, resumable and budgeted; one results table.

Each run is a ``python -m cutmix_pl fit`` subprocess followed by ``test`` on its last checkpoint, in its own run
folder ``<out>/runs/<run name>/version_0``. The grids are named presets (``--grid``, listed by ``--list``), each
run a list of config files plus flags, in priority order: the runs that matter most come first, so a budget that
runs out drops the least important ones. Flags this script does not know are passed to every run, as in
``compare.py`` (e.g. ``--trainer.limit_train_batches 10``).

    python scripts/sweep.py --grid smoke --data-dir data --out results/smoke             # 2 tiny CPU runs
    python scripts/sweep.py --grid gpu-results --data-dir data --out results/gpu --parallel 4 --budget-minutes 60
    python scripts/sweep.py --grid gpu-results ... --reuse           # skip finished runs, resume interrupted ones
    python scripts/sweep.py --grid gpu-results ... --throughput      # images/s of 1 run alone vs K at once

Concurrency: ``--parallel K`` runs K processes at once (on a GPU they share the card; on a CPU each gets
``--threads`` torch threads through OMP_NUM_THREADS, by default the cores divided by K). Default K: 1 without a
GPU (sequential), 4 with one.

Resume (``--reuse``): a run whose folder holds FINISHED (the CLI writes it when a fit ends normally) and test
events is skipped; a fit that stopped early (a ``last.ckpt`` but no FINISHED) continues with ``--ckpt_path <run
folder>`` and the same settings; a missing or stale test is run again. SIGINT/SIGTERM/SIGHUP to this script is
passed on once to the running fits, which save ``last.ckpt`` and stop; the table is still written.

Budget (``--budget-minutes B``): a run is launched only if its estimated time fits in what is left of B (counted
from the start of this sweep); the runs not started are listed as "not run (budget)". The estimate is the preset's
per-run minutes (one run alone, fit + test) times a calibration factor: before any run of this sweep has finished,
k / s_k, k the processes that will share the machine (K, or fewer for the grid's last runs) and s_k their aggregate
speed-up over one process, ``--speedup`` at K (as ``--throughput`` measures it; 1 assumes sharing gains nothing) and
linear from 1 alone (``slowdown``); after, the measured wall minutes of this sweep's finished runs over their
preset minutes.
A run without a preset estimate is estimated by the mean of the finished runs (and launched if there are none).
``--estimate-minutes M`` replaces the preset's minutes of every run (for flags that change the runs' length, e.g.
``--trainer.max_epochs 30``); else ``--estimate-scale S`` multiplies the preset's (for a faster engine: its measured
minutes over the preset's). With ``--reuse``, a fit to resume is estimated by the share of its epochs not yet done,
a run that needs only its test as a tenth of a run. ``--no-test`` runs the fits alone (a probe of a fit's time, as the
GPU suite's cold start): their rows have no test metrics, and ``--reuse`` counts a finished fit as done.

Engine (``--engine graphs``): every run also gets ENGINE's flags (the transform compiled, static shapes, the
network's forward and backward as CUDA graphs) and its setting the suffix ``-graphs``, so that its runs never mix
with eager ones in a folder or a table.

Earlier sweeps (``--prior CSV ...``): the results.csv of sweeps made elsewhere, e.g. on an earlier GPU machine
(docs/sweeps/ keeps them). A run of the grid that one of them lists as done and tested, with the same configs and
flags (those given to every run included), is not run again; its row is taken into the table as it was (status
``done (earlier: <file>)``, no curve), unless --out holds the run done and tested: this machine's own result wins.
This is how a grid larger than one GPU lease is finished over several.

Outputs in ``--out``: ``results.md`` and ``results.csv`` (one row per run: name, method, seed, setting, status,
test accuracy, top-5, ECE, fit minutes, images/s, configs, flags (every run's included), the device and date of its
last fit), a summary over seeds (mean and spread per method x setting) in
``results.md``, and ``val_acc.png`` (the validation curves).

How the figures are computed:
  * test acc, top-5, ECE: the ``test/*`` scalars of the run's ``test/`` events (last checkpoint, as compare.py);
  * fit minutes: the wall time of the fit process(es) as this script measured it, summed over restarts (start-up,
    data loading, compilation, validation and checkpoints included: what the run costs); for a run this script
    did not time, the span of its fit events (compare.read_fit);
  * images/s: training images between the first and the last logged training step (``train/lr``, one point every
    ``trainer.log_every_n_steps`` steps) over the wall time between them, summed over the fit's event files
    (one per process start). Start-up, compilation and the first logging interval fall outside the window; the
    validation and checkpoints inside it count (it is the rate at which the run trains). Images per step: the
    training images of an epoch over its steps, from the run's config.yaml (batch size, val_size, train_size,
    limit_train_batches) and the size of the data set, so a short last batch is counted as it is.
``--throughput`` runs one short fit alone, then K copies at once (fresh folders under ``<out>/throughput``), and
prints the images/s of each (as above), the aggregate of the K and its ratio to the single run. The aggregate is
measured over the interval in which all K were training: each run's images in it (its logged steps,
interpolated linearly to the interval's ends) summed, over the interval's length.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # compare.py beside this file
sys.path.insert(0, str(REPO))  # cutmix_pl from a checkout without installing
from compare import METHODS, plot, read_fit, scalars  # noqa: E402

CONFIGS = REPO / "cutmix_pl" / "configs"


# -- the grids ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One fit + test: configs (files in configs/, after cutmix.yaml), the method's overlay, then flags."""

    method: str  # a key of compare.METHODS: cutmix, baseline (no mixing), mixup
    seed: int
    setting: str  # short label of everything but method and seed, e.g. "fast-200ep"
    configs: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    minutes: float | None = None  # estimated wall minutes of fit + test, one run alone on the intended machine

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.setting}-{self.method}-s{self.seed}")

    def config_args(self) -> list[str]:
        """``--config`` for each of the setting's files, then the method's overlay (compare.METHODS)."""
        return [a for c in (*self.configs, *METHODS[self.method]) for a in ("--config", str(CONFIGS / c))]


def grid(methods: tuple[str, ...], seeds: tuple[int, ...], setting: str, configs: tuple[str, ...] = (),
         flags: tuple[str, ...] = (), minutes: float | None = None) -> list[Run]:
    """Every method for every seed, seed by seed (so that a cut-off budget keeps the methods paired)."""
    return [Run(m, s, setting, configs, flags, minutes) for s in seeds for m in methods]


PAIR = ("cutmix", "baseline")  # CutMix vs no mixing
E200 = ("--trainer.max_epochs", "200")
# Tiny CPU runs for tests and the suite's smoke mode (any data set with >= 140 training images).
SMOKE_FLAGS = ("--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
               "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
               "--trainer.log_every_n_steps", "1", "--trainer.enable_model_summary", "false",
               "--data.val_size", "100", "--data.batch_size", "32", "--data.eval_batch_size", "100")
# Per-run minutes on one H100, fit + test alone: fast.yaml 200 epochs took 5.5 min to fit (docs/results.md), plus
# start-up, compilation and the test; the others are scaled from it (guesses until a sweep measures them).
PRESETS: dict[str, list[Run]] = {
    "smoke": grid(PAIR, (0,), "smoke", ("smoke.yaml",), SMOKE_FLAGS, minutes=0.3),  # 2-core CPU: 8 s + 7 s
    "gpu-results": [
        # first: the comparison that is missing on a GPU, at the recipe that is cheapest there
        *grid(PAIR, (0, 1), "fast-200ep", ("fast.yaml",), E200, minutes=6.5),
        # the default recipe (batch 128, no compile) on a GPU: its time is not measured yet
        *grid(PAIR, (0, 1), "b128-200ep", (), ("--trainer.accelerator", "gpu"), minutes=12.0),
        # lower priority: a longer budget, a deeper network, the other weight decay, a smaller mixing alpha
        *grid(PAIR, (0,), "fast-400ep", ("fast.yaml",), ("--trainer.max_epochs", "400"), minutes=12.0),
        *grid(PAIR, (0,), "fast-200ep-depth56", ("fast.yaml",), (*E200, "--model.net.depth", "56"), minutes=14.0),
        # weight decay 5e-4 is fast.yaml's own: its arm is fast-200ep above
        *grid(PAIR, (0,), "fast-200ep-wd1e-4", ("fast.yaml",),
              (*E200, "--model.optimizer.init_args.weight_decay", "1e-4"), minutes=6.5),
        *grid(("cutmix",), (0,), "fast-200ep-alpha0.5", ("fast.yaml",),
              (*E200, "--data.mixer.init_args.alpha", "0.5"), minutes=6.5),
    ],
}


# The static-shape engine (docs/speed.md): the transform compiled into one graph, every batch one shape, the
# network's forward and backward captured as CUDA graphs (torch.compile's reduce-overhead mode).
ENGINE = ("--data.compile_transform", "true", "--data.drop_last", "true", "--model.compile", "reduce-overhead")


def with_engine(runs: list[Run]) -> list[Run]:
    """The runs on the static-shape engine: ENGINE's flags after their own, ``-graphs`` after their setting."""
    return [replace(r, setting=f"{r.setting}-graphs", flags=(*r.flags, *ENGINE)) for r in runs]


# -- where a run's files are --------------------------------------------------------------------------------------
def run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name / "version_0"


def ledger_path(out: Path, name: str) -> Path:
    """This script's record of a run's processes (beside version_0, not in it: the CLI owns the run folder)."""
    return out / "runs" / name / "sweep.json"


def read_ledger(out: Path, name: str) -> dict[str, list[dict[str, Any]]]:
    path = ledger_path(out, name)
    return json.loads(path.read_text()) if path.is_file() else {"fit": [], "test": []}


def add_to_ledger(out: Path, name: str, sub: str, entry: dict[str, Any]) -> None:
    ledger = read_ledger(out, name)
    ledger.setdefault(sub, []).append(entry)
    ledger_path(out, name).parent.mkdir(parents=True, exist_ok=True)
    ledger_path(out, name).write_text(json.dumps(ledger, indent=1))


def is_finished(folder: Path) -> bool:
    return (folder / "FINISHED").is_file()


def has_test(folder: Path) -> bool:
    return any((folder / "test").glob("events.out.tfevents.*"))


def is_done(folder: Path) -> bool:
    """The run's fit ended normally and its test was written: nothing is left to do."""
    return is_finished(folder) and has_test(folder)


# -- images per second ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def training_set_size(data_dir: str) -> int:
    """Images in the data set's training batches (before the validation split)."""
    from cutmix_pl import cifar

    return len(cifar.load(data_dir)[0].labels)


def epoch_images_and_steps(config: dict[str, Any], n_total: int) -> tuple[int, int]:
    """Training images and steps of one epoch of a single-device run, by the DataModule's and Lightning's rules."""
    data, trainer = config["data"], config["trainer"]
    n = n_total - int(data.get("val_size") or 0)
    if data.get("train_size"):
        n = min(n, int(data["train_size"]))
    batch = int(data["batch_size"])
    starts = list(range(0, n, batch))
    if len(starts) > 1 and n - starts[-1] == 1:  # a lone last image waits for the next epoch (BatchNorm)
        starts.pop()
        n -= 1
    sizes = [min(batch, n - s) for s in starts]
    limit = trainer.get("limit_train_batches")
    if limit is None:
        steps = len(sizes)
    elif isinstance(limit, float) and 0 <= limit <= 1:  # Lightning: a float in [0, 1] is a fraction
        steps = int(len(sizes) * limit)
    else:  # an int, or a whole float above 1 (jsonargparse writes 3 as 3.0), is a count
        steps = min(int(limit), len(sizes))
    return sum(sizes[:steps]), steps


def images_per_step(folder: Path) -> float | None:
    """Mean training images per optimiser step of a run, from its config.yaml and its data set."""
    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        return None
    config = yaml.safe_load(cfg_path.read_text())
    images, steps = epoch_images_and_steps(config, training_set_size(str(config["data"]["data_dir"])))
    return images / steps if steps else None


def step_series(folder: Path) -> list[list[tuple[int, float]]]:
    """(global step, wall time) of every logged training step, one list per event file (process start)."""
    out = []
    for events in sorted(folder.glob("events.out.tfevents.*")):
        series = [(step, wall) for step, _, wall in scalars(events).get("train/lr", [])]
        if len(series) >= 2:
            out.append(series)
    return out


def train_rate(folder: Path) -> float | None:
    """Training images/s of a fit run: images between its first and last logged step over the time between."""
    per_step = images_per_step(folder)
    images = seconds = 0.0
    for series in step_series(folder):
        (s0, w0), (s1, w1) = series[0], series[-1]
        images += (s1 - s0) * (per_step or 0)
        seconds += w1 - w0
    return images / seconds if per_step and seconds > 0 else None


def steps_at(series: list[tuple[int, float]], t: float) -> float:
    """The (fractional) global step a run had reached at wall time ``t``, by linear interpolation."""
    for (s0, w0), (s1, w1) in zip(series, series[1:]):
        if w0 <= t <= w1:
            return s0 + (s1 - s0) * ((t - w0) / (w1 - w0) if w1 > w0 else 1.0)
    return float(series[0][0] if t < series[0][1] else series[-1][0])


def aggregate_rate(folders: list[Path]) -> tuple[float | None, float]:
    """Images/s of several concurrent runs together, over the interval in which all were training; and that
    interval as a fraction of the mean run's training window (near 1: the runs overlapped well)."""
    series = [step_series(f)[-1] for f in folders]
    start, end = max(s[0][1] for s in series), min(s[-1][1] for s in series)
    mean_window = statistics.mean(s[-1][1] - s[0][1] for s in series)
    if end <= start:
        return None, 0.0
    images = sum((steps_at(s, end) - steps_at(s, start)) * (images_per_step(f) or 0) for s, f in zip(series, folders))
    return images / (end - start), (end - start) / mean_window


def slowdown(k: int, parallel: int, speedup: float) -> float:
    """How much longer a run takes when k processes share the machine than alone: k over their aggregate speed-up,
    which is ``speedup`` at ``parallel`` processes and 1 alone; in between it is taken as linear, which is on the
    safe side when, as usual, the first extra processes gain the most."""
    gain = max(speedup, 1.0)
    at_k = 1 + (gain - 1) * (k - 1) / (parallel - 1) if parallel > 1 else 1.0
    return k / min(at_k, k)


def work_left(folder: Path) -> float:
    """The share of a whole run that a run folder still needs: 1 for a fresh run, the epochs not yet done for a fit
    to resume (by its last logged epoch), 0.1 for a test alone (a test is a small part of a run), 0 when done."""
    if not folder.is_dir():
        return 1.0
    if is_finished(folder):
        return 0.0 if is_done(folder) else 0.1
    if not (folder / "checkpoints" / "last.ckpt").is_file():
        return 1.0
    epochs = read_fit(folder)[0].get("epoch")
    max_epochs = yaml.safe_load((folder / "config.yaml").read_text())["trainer"].get("max_epochs") or 0
    return 1.0 if not epochs or max_epochs <= 0 else max(0.0, 1 - epochs[-1][1] / max_epochs)


# -- running processes ----------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when this script dies, even by SIGKILL (Linux), so that a fit is never
    left running without its sweep, and it still saves last.ckpt on the way out."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Job:
    """A run moving through its stages (fit, test) as processes; one process at a time."""

    run: Run
    stage: str = ""  # "fit" or "test" while a process runs
    proc: subprocess.Popen | None = None
    started: float = 0.0
    fit_ran: bool = False  # the fit ran in this sweep (its test must follow)
    resumed: bool = False
    fresh: bool = True  # every stage ran here from scratch: the run's time can calibrate the estimates
    minutes: float = 0.0  # wall minutes of this sweep's processes for the run
    status: str | None = None
    log: Any = None


@dataclass
class Sweep:
    """Launches and follows the jobs of one sweep: K processes at a time, within the budget."""

    args: argparse.Namespace
    extra: list[str]
    with_test: bool = True  # False: fits only (the throughput runs, --no-test)
    start: float = field(default_factory=time.monotonic)
    done: list[tuple[Run, float]] = field(default_factory=list)  # fresh finished runs and their wall minutes
    stop_signals: int = 0
    forwarded: bool = False

    # - commands -
    def command(self, sub: str, run: Run, more: list[str]) -> list[str]:
        a = self.args
        return [sys.executable, "-m", "cutmix_pl", sub, *run.config_args(),
                "--seed_everything", str(run.seed), "--data.data_dir", str(a.data_dir.resolve()),
                "--data.download", str(a.download).lower(),
                "--trainer.logger.init_args.save_dir", str((a.out / "runs").resolve()),
                "--trainer.logger.init_args.name", run.name, "--trainer.logger.init_args.version", "0",
                "--trainer.enable_progress_bar", "false", *run.flags, *self.extra, *more]

    def env(self) -> dict[str, str]:
        threads = str(self.args.threads)
        return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                    OMP_NUM_THREADS=threads, TORCHINDUCTOR_COMPILE_THREADS=threads, PYTHONUNBUFFERED="1")

    def launch(self, job: Job, sub: str, more: list[str]) -> None:
        folder = run_dir(self.args.out, job.run.name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        job.log = open(folder.parent / f"{sub}.log", "a")  # noqa: SIM115 (closed when the process ends)
        cmd = self.command(sub, job.run, more)
        print(f"+ [{job.run.name}] {' '.join(cmd)}", file=job.log, flush=True)
        if not self.args.quiet:
            print(f"sweep: {sub} {job.run.name}{' (resumed)' if '--ckpt_path' in more and sub == 'fit' else ''}",
                  flush=True)
        # own session: a Ctrl-C at the terminal reaches the fits once, through this script, not twice (the second
        # signal would make a fit stop without saving)
        job.proc = subprocess.Popen(cmd, cwd=self.args.out, env=self.env(), stdout=job.log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        job.stage, job.started = sub, time.monotonic()

    # - a job's stages -
    def begin(self, job: Job) -> None:
        """Start the first stage the run still needs (or settle it at once when it needs none)."""
        folder = run_dir(self.args.out, job.run.name)
        if not (self.args.reuse and is_finished(folder)):
            job.resumed = self.args.reuse and (folder / "checkpoints" / "last.ckpt").is_file()
            job.fresh = not job.resumed
            self.launch(job, "fit", ["--ckpt_path", str(folder)] if job.resumed else [])
        elif self.with_test and not has_test(folder):
            job.fresh = False
            self.launch_test(job)
        else:
            job.status = "done (reused)"

    def launch_test(self, job: Job) -> None:
        folder = run_dir(self.args.out, job.run.name)
        shutil.rmtree(folder / "test", ignore_errors=True)  # a stale test of an earlier checkpoint
        self.launch(job, "test", ["--ckpt_path", str(folder / "checkpoints" / "last.ckpt")])

    def advance(self, job: Job) -> None:
        """The job's process ended: record it, then start its next stage or settle its status."""
        rc, seconds = job.proc.returncode, time.monotonic() - job.started
        job.log.close()
        job.minutes += seconds / 60
        entry = {"rc": rc, "seconds": round(seconds, 2), "ended": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "device": device_name()}
        if job.stage == "fit":
            entry["resumed"] = job.resumed
        add_to_ledger(self.args.out, job.run.name, job.stage, entry)
        job.proc = None
        if rc != 0:
            stopped = self.stop_signals or rc in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP)
            job.status = "interrupted" if stopped else f"failed ({job.stage} exit {rc})"
        elif job.stage == "fit" and not self.with_test:
            job.status = "done"
        elif job.stage == "fit" and not self.stop_signals:
            job.fit_ran = True
            self.launch_test(job)
        elif job.stage == "fit":
            job.status = "interrupted"  # the fit ended, but the sweep is stopping: its test is left for --reuse
        else:
            job.status = "done (resumed)" if job.resumed else "done" if job.fit_ran else "done (test rerun)"
            if job.fresh:
                self.done.append((job.run, job.minutes))

    # - the budget -
    def estimate(self, run: Run, sharing: int | None = None) -> float | None:
        """Estimated wall minutes of ``run`` under this sweep's concurrency (see the module docstring); ``sharing``:
        the processes that will share the machine with it, itself included (default --parallel; fewer when the
        grid's last runs are launched)."""
        timed = [(r, m) for r, m in self.done if r.minutes]
        if run.minutes is not None:
            if timed:
                return run.minutes * sum(m for _, m in timed) / sum(r.minutes for r, _ in timed)
            return run.minutes * slowdown(sharing or self.args.parallel, self.args.parallel, self.args.speedup)
        return statistics.mean(m for _, m in self.done) if self.done else None

    def remaining(self) -> float:
        return self.args.budget_minutes - (time.monotonic() - self.start) / 60

    # - the loop -
    def on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signals += 1
        print(f"sweep: {signal.Signals(signum).name}: no new runs; the running fits save and stop", flush=True)

    def execute(self, runs: list[Run]) -> dict[str, str]:
        """Run ``runs`` (priority order), at most ``--parallel`` processes at once; the status of each by name."""
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            return self._loop(runs)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _loop(self, runs: list[Run]) -> dict[str, str]:
        status: dict[str, str] = {}
        pending = [Job(r) for r in runs]
        active: list[Job] = []
        while pending or active:
            while pending and len(active) < self.args.parallel and not self.stop_signals:
                job = pending.pop(0)
                if self.args.budget_minutes is not None and not self.needs_nothing(job.run):
                    to_run = sum(not self.needs_nothing(j.run) for j in pending)
                    est = self.estimate(job.run, min(self.args.parallel, len(active) + 1 + to_run))
                    if est is not None and self.args.reuse:
                        est *= work_left(run_dir(self.args.out, job.run.name))
                    if est is not None and est > self.remaining():
                        status[job.run.name] = "not run (budget)"
                        print(f"sweep: {job.run.name} not run: estimated {est:.1f} min, "
                              f"{max(self.remaining(), 0):.1f} min of the budget left", flush=True)
                        continue
                self.begin(job)
                if job.status:
                    status[job.run.name] = job.status
                else:
                    active.append(job)
            self.forward_stop(active)
            time.sleep(0.2)
            for job in list(active):
                if job.proc is not None and job.proc.poll() is not None:
                    self.advance(job)
                if job.status:
                    status[job.run.name] = job.status
                    active.remove(job)
            if self.stop_signals and not active:
                for job in pending:
                    status[job.run.name] = "not run (stopped)"
                pending = []
        return {r.name: status[r.name] for r in runs}

    def needs_nothing(self, run: Run) -> bool:
        folder = run_dir(self.args.out, run.name)
        return self.args.reuse and (is_done(folder) if self.with_test else is_finished(folder))

    def forward_stop(self, active: list[Job]) -> None:
        """Pass a stop on to the running processes once (fits save last.ckpt); a second stop kills them."""
        if self.stop_signals == 1 and not self.forwarded:
            self.forwarded = True
            for job in active:
                if job.proc is not None:
                    job.proc.send_signal(signal.SIGTERM)
        elif self.stop_signals > 1:
            for job in active:
                if job.proc is not None and job.proc.poll() is None:
                    job.proc.kill()


# -- the results ----------------------------------------------------------------------------------------------
def last_value(series: dict[str, list[tuple[int, float, float]]], tag: str) -> float | None:
    return series[tag][-1][1] if series.get(tag) else None


def run_flags(run: Run, extra: list[str]) -> str:
    """Every flag the run gets: its own, then those given to every run of the sweep."""
    return " ".join([*run.flags, *extra])


def ledger_minutes(out: Path, name: str) -> float | None:
    """Wall minutes of a run's fit and test processes that this script timed, None if none."""
    ledger = read_ledger(out, name)
    timed = [e["seconds"] for stage in ("fit", "test") for e in ledger.get(stage, [])]
    return sum(timed) / 60 if timed else None


def result_row(out: Path, run: Run, status: str, extra: list[str]) -> dict[str, Any]:
    folder = run_dir(out, run.name)
    row: dict[str, Any] = {"name": run.name, "method": run.method, "seed": run.seed, "setting": run.setting,
                           "status": status, "test_acc": None, "test_top5": None, "test_ece": None,
                           "fit_minutes": None, "images_per_s": None, "val_acc_curve": [],
                           "configs": " ".join(run.configs), "flags": run_flags(run, extra), "device": None,
                           "date": None}
    if not folder.is_dir():
        return row
    fit, span = read_fit(folder)
    row["val_acc_curve"] = [v for _, v, _ in fit.get("val/acc", [])]
    fits = read_ledger(out, run.name)["fit"]
    row["fit_minutes"] = sum(e["seconds"] for e in fits) / 60 if fits else (span / 60 if span is not None else None)
    row["images_per_s"] = train_rate(folder)
    # where and when its fit last ran (this machine, if this script did not time it)
    row["device"] = fits[-1].get("device", device_name()) if fits else device_name()
    row["date"] = fits[-1]["ended"][:10] if fits else None
    if has_test(folder):
        test = read_fit(folder / "test")[0]
        row.update(test_acc=last_value(test, "test/acc"), test_top5=last_value(test, "test/acc_top5"),
                   test_ece=last_value(test, "test/ece"))
    return row


def fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method x setting (first appearance order): test accuracy over the seeds that have one."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    out = []
    for (method, setting), members in groups.items():
        accs = [r["test_acc"] for r in members if r["test_acc"] is not None]
        eces = [r["test_ece"] for r in members if r["test_ece"] is not None]
        out.append({"method": method, "setting": setting, "runs": len(members), "tested": len(accs),
                     "seeds": [r["seed"] for r in members if r["test_acc"] is not None],
                     "acc_mean": statistics.mean(accs) if accs else None,
                     "acc_sd": statistics.stdev(accs) if len(accs) > 1 else None,
                     "acc_min": min(accs) if accs else None, "acc_max": max(accs) if accs else None,
                     "ece_mean": statistics.mean(eces) if eces else None})
    return out


COLUMNS = ["name", "method", "seed", "setting", "status", "test_acc", "test_top5", "test_ece", "fit_minutes",
           "images_per_s", "configs", "flags", "device", "date"]
NUMBERS = ("test_acc", "test_top5", "test_ece", "fit_minutes", "images_per_s")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})  # older tables lack columns


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| run | method | seed | setting | status | test acc | top-5 | ECE | fit min | images/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['method']} | {r['seed']} | {r['setting']} | {r['status']} | "
                     f"{fmt(r['test_acc'], '.2%')} | {fmt(r['test_top5'], '.2%')} | {fmt(r['test_ece'], '.4f')} | "
                     f"{fmt(r['fit_minutes'], '.1f')} | {fmt(r['images_per_s'], ',.0f')} |")
    lines += ["", "Over seeds (test accuracy of the runs that were tested; spread: sample standard deviation and "
              "min - max):", "", "| method | setting | runs | tested (seeds) | mean acc | sd | min - max | mean ECE |",
              "|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        span = f"{s['acc_min']:.2%} - {s['acc_max']:.2%}" if s["tested"] > 1 else ""
        lines.append(f"| {s['method']} | {s['setting']} | {s['runs']} | {s['tested']} "
                     f"({', '.join(map(str, s['seeds'])) or '-'}) | {fmt(s['acc_mean'], '.2%')} | "
                     f"{fmt(s['acc_sd'], '.2%')} | {span} | {fmt(s['ece_mean'], '.4f')} |")
    lines += ["", "fit min: wall time of the fit process(es); images/s: training images between the first and last "
              "logged step over the time between (scripts/sweep.py explains both)."]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=1)
def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} logical cores)"


def write_results(args: argparse.Namespace, extra: list[str], runs: list[Run], status: dict[str, str],
                  earlier: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [earlier[r.name] if r.name in earlier else result_row(args.out, r, status[r.name], extra) for r in runs]
    header = (f"Sweep `{args.grid}` on {device_name()}, {time.strftime('%Y-%m-%d')}: {len(rows)} runs, "
              f"{args.parallel} at a time"
              + (f", budget {args.budget_minutes:g} min" if args.budget_minutes is not None else "")
              + (f"; flags for every run: `{' '.join(extra)}`" if extra else "")
              + (f"; {len(earlier)} run(s) taken from earlier sweeps (status `done (earlier: ...)`)" if earlier else "")
              + (". Fits only (--no-test): no test metrics." if args.no_test
                 else ". Test metrics of the last epoch's checkpoint."))
    (args.out / "results.md").write_text(markdown(rows, header))
    write_csv(rows, args.out / "results.csv")
    curves = [dict(r, method=r["name"]) for r in rows if r["val_acc_curve"]]
    with warnings.catch_warnings():  # no run has a curve yet (all left out by the budget): an empty plot is right
        warnings.filterwarnings("ignore", "No artists with labels found")
        plot(curves, args.out / "val_acc.png", title=f"sweep {args.grid}: validation accuracy")
    return rows


def read_prior(paths: list[Path], runs: list[Run], extra: list[str]) -> dict[str, dict[str, Any]]:
    """The runs of the grid that an earlier sweep's results.csv lists as done and tested with the same configs and
    flags (``extra`` included), as table rows (the later file wins)."""
    wanted = {r.name: r for r in runs}
    earlier: dict[str, dict[str, Any]] = {}
    for path in paths:
        if not path.is_file():
            sys.exit(f"sweep.py: error: --prior {path}: no such file; fix: pass the results.csv of an earlier sweep")
        with path.open() as f:
            for row in csv.DictReader(f):
                run = wanted.get(row.get("name", ""))
                if run is None or not row.get("status", "").startswith("done") or not row.get("test_acc"):
                    continue
                if (row.get("configs", ""), row.get("flags", "")) != (" ".join(run.configs), run_flags(run, extra)):
                    print(f"sweep: {run.name} in {path} ran with other configs or flags: run again", flush=True)
                    continue
                earlier[run.name] = {**row, "seed": int(row["seed"]), "status": f"done (earlier: {path.name})",
                                     "val_acc_curve": [],
                                     **{k: float(row[k]) if row.get(k) else None for k in NUMBERS}}
    return earlier


# -- throughput: one run alone vs K at once -----------------------------------------------------------------------
def throughput_runs(args: argparse.Namespace, runs: list[Run]) -> tuple[Run, dict[str, list[Run]]]:
    """The grid's first run of ``--throughput-setting``, and the short copies of it that ``--throughput`` times:
    one alone ("alone"), then ``--parallel`` at once ("x<K>")."""
    k = args.parallel
    if k < 2:
        sys.exit("sweep.py: error: --throughput compares K concurrent runs with one; pass --parallel K >= 2")
    base = next((r for r in runs if args.throughput_setting in (None, r.setting)), None)
    if base is None:
        sys.exit(f"sweep.py: error: no run of --grid {args.grid} has the setting {args.throughput_setting!r}")
    log_every = max(1, args.throughput_steps // 20)
    short = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(args.throughput_steps),
             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
             "--trainer.log_every_n_steps", str(log_every), "--model.log_images", "false")
    return base, {label: [Run(base.method, base.seed, f"{label}-{i}", base.configs, (*base.flags, *short))
                          for i in range(count)] for label, count in (("alone", 1), (f"x{k}", k))}


def throughput(args: argparse.Namespace, extra: list[str], runs: list[Run]) -> dict[str, Any]:
    """The same short fit once alone, then ``--parallel`` copies at once; images/s of each and the ratio."""
    k = args.parallel
    base, plan = throughput_runs(args, runs)
    root = args.out / "throughput"
    shutil.rmtree(root, ignore_errors=True)  # a measurement, never resumed
    results: dict[str, Any] = {"setting": base.setting, "method": base.method, "steps": args.throughput_steps,
                               "processes": k, "threads_per_process": args.threads}
    for label, copies in plan.items():
        count = len(copies)
        sub = argparse.Namespace(**{**vars(args), "out": root, "parallel": count, "reuse": False,
                                    "budget_minutes": None})
        status = Sweep(sub, extra, with_test=False).execute(copies)
        failed = [n for n, s in status.items() if s != "done"]
        if failed:
            sys.exit(f"sweep.py: throughput run(s) {failed} did not finish; see {root}/runs/<name>/fit.log")
        folders = [run_dir(root, r.name) for r in copies]
        each = [train_rate(f) for f in folders]
        results[label] = {"each": each}
        if count > 1:
            total, overlap = aggregate_rate(folders)
            results[label].update(all=total, overlap=overlap)
    alone, together = results["alone"]["each"][0], results[f"x{k}"]["all"]
    results["ratio"] = together / alone if alone and together else None
    text = throughput_text(results, k)
    print(text)
    (args.out / "throughput.md").write_text(text)
    (args.out / "throughput.json").write_text(json.dumps(results, indent=1))
    return results


def throughput_text(res: dict[str, Any], k: int) -> str:
    x = res[f"x{k}"]
    each = ", ".join(fmt(v, ",.0f") for v in x["each"])
    return (f"Throughput, `{res['setting']}` {res['method']}, {res['steps']} training steps a run, "
            f"on {device_name()}:\n\n"
            f"| processes | images/s, each | images/s, all together |\n|---|---|---|\n"
            f"| 1 | {fmt(res['alone']['each'][0], ',.0f')} | {fmt(res['alone']['each'][0], ',.0f')} |\n"
            f"| {k} at once | {each} | {fmt(x['all'], ',.0f')} |\n\n"
            f"ratio ({k} at once / 1 alone): **{fmt(res['ratio'], '.2f')}**; the {k} runs all trained during "
            f"{x['overlap']:.0%} of a run's training window (the aggregate is measured there).\n")


# -- the command line ---------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--grid", default="smoke", choices=list(PRESETS), help="the preset grid (default: smoke)")
    p.add_argument("--list", action="store_true", help="print the grid's runs and exit")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only the runs of the grid with these names (or name prefixes)")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--download", action="store_true", help="let the runs download CIFAR-10")
    p.add_argument("--out", type=Path, default=Path("results/sweep"))
    p.add_argument("--parallel", type=int, default=None, help="processes at once (default: 1 on a CPU, 4 on a GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process, through OMP_NUM_THREADS (default: cores // parallel)")
    p.add_argument("--reuse", action="store_true", help="skip finished runs, resume interrupted fits, redo tests")
    p.add_argument("--budget-minutes", type=float, default=None, help="launch no run that would not end within it")
    p.add_argument("--estimate-minutes", type=float, default=None,
                   help="every run's minutes alone (fit + test), instead of the preset's: for flags that shorten "
                        "or lengthen the runs, e.g. --trainer.max_epochs 30")
    p.add_argument("--estimate-scale", type=float, default=1.0,
                   help="multiply every run's estimated minutes (e.g. a faster engine's measured / preset minutes)")
    p.add_argument("--engine", choices=("eager", "graphs"), default="eager",
                   help="graphs: every run on the static-shape engine (ENGINE's flags; the setting gets -graphs)")
    p.add_argument("--prior", type=Path, nargs="+", default=[], metavar="CSV",
                   help="results.csv of earlier sweeps: runs they list as done (same configs and flags) are not rerun")
    p.add_argument("--speedup", type=float, default=1.0,
                   help="aggregate speed-up of --parallel processes over one, for the first estimates (default 1)")
    p.add_argument("--throughput", action="store_true", help="measure images/s of 1 run alone vs --parallel at once")
    p.add_argument("--throughput-steps", type=int, default=200, help="training steps of each throughput run")
    p.add_argument("--throughput-setting", default=None,
                   help="the grid setting whose first run the throughput runs copy (default: the grid's first run)")
    p.add_argument("--no-test", action="store_true",
                   help="fits only, no test of their checkpoints (a probe of a fit's time; no test metrics)")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    args, extra = p.parse_known_args(argv)  # anything else goes to every run, e.g. --trainer.limit_train_batches 5
    if args.parallel is None:
        import torch

        args.parallel = 4 if torch.cuda.is_available() else 1
    if args.parallel < 1:
        p.error(f"--parallel must be >= 1, got {args.parallel}; fix: pass --parallel 1 to run one at a time")
    if args.estimate_scale <= 0:
        p.error(f"--estimate-scale must be > 0, got {args.estimate_scale:g}; fix: pass a run's measured minutes over "
                "its preset's (1 keeps the presets)")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    args.out = args.out.absolute()  # the runs start in --out: the paths they are given must not be relative
    return args, extra


def select(args: argparse.Namespace) -> list[Run]:
    runs = PRESETS[args.grid] if args.engine == "eager" else with_engine(PRESETS[args.grid])
    if args.estimate_minutes is not None:  # the user's own figure: not scaled
        runs = [replace(r, minutes=args.estimate_minutes) for r in runs]
    elif args.estimate_scale != 1.0:
        runs = [replace(r, minutes=r.minutes * args.estimate_scale) if r.minutes else r for r in runs]
    if args.only:
        runs = [r for r in runs if any(r.name.startswith(o) for o in args.only)]
        if not runs:
            sys.exit(f"sweep.py: error: --only {' '.join(args.only)} matches no run of --grid {args.grid} "
                     "(--list shows them)")
    return runs


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | dict[str, Any]:
    args, extra = parse(argv)
    runs = select(args)
    if args.list:
        for r in runs:
            print(f"{r.name}: {' '.join([*r.config_args(), *r.flags])}  (~{fmt(r.minutes, 'g') or '?'} min alone)")
        return []
    args.out.mkdir(parents=True, exist_ok=True)
    if args.throughput:
        return throughput(args, extra, runs)
    earlier = read_prior(args.prior, runs, extra)
    for name in [n for n in earlier if is_done(run_dir(args.out, n))]:
        del earlier[name]  # a run done here, in --out, is this machine's own result: it wins over an earlier one
    todo = [r for r in runs if r.name not in earlier]
    taken = [r.name for r in todo if run_dir(args.out, r.name).exists()]
    if taken and not args.reuse:
        sys.exit(f"sweep.py: error: {args.out}/runs already holds {', '.join(taken)}; fix: pass --reuse to skip "
                 "finished runs and resume the others, or choose another --out")
    status = Sweep(args, extra, with_test=not args.no_test).execute(todo)
    rows = write_results(args, extra, runs, status, earlier)
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out / 'results.md'}, {args.out / 'results.csv'} and {args.out / 'val_acc.png'}")
    return rows


def unfinished(rows: list[dict[str, Any]]) -> list[str]:
    """Runs that failed or were interrupted (not those the budget left out)."""
    return [r["name"] for r in rows if r["status"].startswith(("failed", "interrupted"))]


if __name__ == "__main__":
    result = main()
    bad = unfinished(result) if isinstance(result, list) else []
    if bad:  # exit status 1: the table is written, but not every run ended
        sys.exit(f"sweep.py: {len(bad)} run(s) failed or were interrupted: {', '.join(bad)} (logs: "
                 "<out>/runs/<name>/fit.log and test.log; --reuse resumes them)")

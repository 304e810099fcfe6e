"""A results grid: arms (lists of recipes) x seeds, a ``fit`` and a ``test`` per cell, K cells at once, resumable.

    python scripts/grid.py --out results/short --data-dir data --arm cutmix=short --arm baseline=short,baseline \\
        --seeds 0 1 --parallel 2 -- --trainer.max_epochs 30

An arm is NAME=RECIPE[,RECIPE...], each recipe a YAML file or the name of a packaged one (``short``:
cutmix_pl/configs/short.yaml), applied in order on top of the default recipe. A cell (arm x seed) is
``python -m cutmix_pl fit --config RECIPE ... --seed_everything SEED`` into DIR/<arm>/s<seed>/version_N (so that
``--ckpt_path last`` there means this cell), then ``python -m cutmix_pl test --ckpt_path <run>``, and with ``--tta``
a second test with ``--model.tta_flip true``. Flags after ``--`` go to every fit and test. A cell's commands and
their output: DIR/<arm>/s<seed>/fit.log and test.log.

``--parallel K`` cells run at once (on one GPU they share it), each process with ``--threads`` torch threads
(OMP_NUM_THREADS; default: the CPU cores divided by K).

The same command again skips finished cells (fit finished, tests recorded), tests a finished fit that lacks its
tests, and resumes an unfinished fit with ``--ckpt_path last`` (which refuses changed settings in one line). A first
Ctrl-C or SIGTERM lets the running fits save last.ckpt and stop; the tables are still written.

DIR/results.csv: a row per cell; test_acc, test_acc_tta and ece are the tests' ``test/acc`` and ``test/ece`` (the
last checkpoint), train_wall_s the span of the fit's event files summed over its process starts (no start-up, no
pause between an interruption and its resume), interruptions the fit's process starts less one (each resume
writes an event file of its own), epochs the last logged epoch + 1. DIR/results.md: per arm, the mean
and half range over seeds and the difference from the first arm, paired by seed. DIR/val_acc.png: the validation
curves (needs matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import events
from cutmix_pl import runs

COLUMNS = ("arm", "seed", "status", "epochs", "precision", "device", "test_acc", "test_acc_tta", "ece",
           "train_wall_s", "interruptions", "run")
RECORD = "cell.json"  # a cell's test metrics, written once its tests are done
# Set per cell by the grid: a flag after -- that changed them would break the layout that resuming relies on.
OWN_FLAGS = ("--ckpt_path", "--seed_everything", "--trainer.logger.init_args.save_dir",
             "--trainer.logger.init_args.name", "--trainer.logger.init_args.version")
STOPPED = {128 + s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def say(line: str) -> None:
    sys.stdout.write(f"grid: {line}\n")  # one write: lines from the cells' threads do not interleave
    sys.stdout.flush()


def fail(message: str) -> None:
    print(f"cutmix-pl: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        fail(f"{message}; fix: see python scripts/grid.py --help")


@dataclass(frozen=True)
class Cell:
    arm: str
    recipes: tuple[Path, ...]
    seed: int

    def base(self, out: Path) -> Path:
        return out / self.arm / f"s{self.seed}"

    def __str__(self) -> str:
        return f"{self.arm} s{self.seed}"


def packaged_recipes() -> Path:
    """cutmix_pl/configs of the installed package (the named recipes)."""
    return Path(runs.__file__).parent.parent / "configs"


def recipe(text: str, arm: str) -> Path:
    path = Path(text)
    if path.is_file():
        return path.absolute()
    packaged = packaged_recipes()
    if re.fullmatch(r"[\w.-]+", text) and (packaged / f"{text}.yaml").is_file():
        return packaged / f"{text}.yaml"
    names = ", ".join(sorted(p.stem for p in packaged.glob("*.yaml")))
    fail(f"--arm {arm}: recipe {text!r} is neither a file nor a packaged recipe ({names}); fix: give a YAML path "
         "or one of those names")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[Cell]]:
    split = argv.index("--") if "--" in argv else len(argv)
    argv, extra = argv[:split], argv[split + 1:]
    p = Parser(prog="grid.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the grid's folder (runs, logs, tables)")
    p.add_argument("--data-dir", type=Path, required=True, help="CIFAR-10 (downloaded there once if missing)")
    p.add_argument("--arm", action="append", required=True, metavar="NAME=RECIPE[,RECIPE...]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--parallel", type=int, default=1, help="cells at once (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / K)")
    p.add_argument("--tta", action="store_true", help="also test with horizontal-flip TTA (test_acc_tta)")
    args = p.parse_args(argv)
    if args.parallel < 1 or (args.threads is not None and args.threads < 1):
        fail(f"--parallel {args.parallel} / --threads {args.threads}: both must be >= 1; fix: e.g. --parallel 1")
    if len(set(args.seeds)) != len(args.seeds):
        fail(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed; fix: give each seed once")
    for flag in extra:
        if flag.split("=")[0] in OWN_FLAGS:
            fail(f"{flag.split('=')[0]} after -- is set by the grid for each cell; fix: leave it out")
    arms: dict[str, tuple[Path, ...]] = {}
    for spec in args.arm:
        name, sep, recipes = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) or not recipes:
            fail(f"--arm {spec}: give NAME=RECIPE[,RECIPE...], NAME of letters, digits, '.', '_', '-'; fix: e.g. "
                 "--arm baseline=short,baseline")
        if name in arms:
            fail(f"--arm {name} is given twice; fix: give each arm its own name")
        arms[name] = tuple(recipe(r, spec) for r in recipes.split(","))
    args.out, args.data_dir = args.out.absolute(), args.data_dir.absolute()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    return args, extra, [Cell(a, r, s) for s in args.seeds for a, r in arms.items()]


# -- a cell's files -------------------------------------------------------------------------------------------
def run_folder(base: Path) -> Path | None:
    """The cell's run: its newest version_N with a last.ckpt (a fit killed before its first checkpoint left none)."""
    runs = [d for d in base.glob("version_*") if (d / "checkpoints" / "last.ckpt").is_file()]
    return max(runs, key=lambda d: int(d.name.rpartition("_")[2]), default=None)


def record(base: Path) -> dict[str, Any]:
    path = base / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def finished(run: Path | None) -> bool:
    """Whether the cell's fit reached its end: the project's own rule (its last.ckpt against its config)."""
    try:
        return run is not None and runs.is_finished(run)
    except ValueError:  # an unreadable last.ckpt or config: not finished; the resume then says what is wrong
        return False


def config(run: Path) -> dict[str, Any]:
    return yaml.safe_load((run / "config.yaml").read_text()) or {}


def device_name(run: Path) -> str:
    if config(run).get("trainer", {}).get("accelerator") != "cpu":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def last(series: events.Series, tag: str) -> float | None:
    return series[tag][-1][1] if series.get(tag) else None


# -- running the cells ----------------------------------------------------------------------------------------
class Grid:
    def __init__(self, args: argparse.Namespace, extra: list[str]) -> None:
        self.args, self.extra = args, extra
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1",
                        TORCHINDUCTOR_COMPILE_THREADS=str(args.threads))
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.signals = 0

    def command(self, sub: str, cell: Cell, more: list[str]) -> list[str]:
        a = self.args
        # the cell's own flags after the user's: a --config among those must not move the run elsewhere
        return [sys.executable, "-m", "cutmix_pl", sub, *(x for r in cell.recipes for x in ("--config", str(r))),
                "--trainer.enable_progress_bar", "false", *self.extra,
                "--data.data_dir", str(a.data_dir), "--data.download", "false", "--seed_everything", str(cell.seed),
                "--trainer.logger.init_args.save_dir", str(a.out / cell.arm),
                "--trainer.logger.init_args.name", f"s{cell.seed}", *more]

    def call(self, sub: str, cell: Cell, more: list[str]) -> int | None:
        """Run one CLI command of the cell, its output into <cell>/<sub>.log; None when the grid is stopping."""
        cmd = self.command(sub, cell, more)
        with open(cell.base(self.args.out) / f"{sub}.log", "a") as log:
            print(f"+ {shlex.join(cmd)}", file=log, flush=True)
            with self.lock:
                if self.stop.is_set():
                    return None
                # its own session: a Ctrl-C at the terminal reaches it once, through on_signal, not twice (a
                # second signal makes a fit stop without saving)
                proc = subprocess.Popen(cmd, cwd=cell.base(self.args.out), env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                self.procs.add(proc)
                if self.stop.is_set():  # a signal between the check above and add(): on_signal did not see it
                    proc.send_signal(signal.SIGTERM)
            rc = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        return rc

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.signals += 1
        self.stop.set()
        say(f"{signal.Signals(signum).name}: " + ("no new commands; the running fits save and stop" if self.signals == 1
                                                  else "the running commands are killed"))
        for proc in list(self.procs):
            proc.send_signal(signal.SIGTERM if self.signals == 1 else signal.SIGKILL)

    def ended(self, cell: Cell, sub: str, rc: int | None) -> str:
        # None: the grid was stopping, so it did not start; < 0: a signal ended it before the CLI took signals over
        if rc is None or rc < 0 or rc in STOPPED:
            return "interrupted"
        log = cell.base(self.args.out) / f"{sub}.log"
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and not ln.startswith("+ ")]
        why = next((ln for ln in reversed(lines) if ln.startswith("cutmix-pl: error")), lines[-1] if lines else "")
        say(f"{cell}: {sub} failed (exit {rc}): {why} (log: {log})")
        return f"failed ({sub} exit {rc})"

    def run(self, cell: Cell) -> str:
        base = cell.base(self.args.out)
        run = run_folder(base)
        done = record(base)
        if finished(run) and "test_acc" in done and (not self.args.tta or "test_acc_tta" in done):
            say(f"{cell}: finished and tested, skipped")
            return "done"
        if self.stop.is_set():
            return "not run"
        base.mkdir(parents=True, exist_ok=True)
        if not finished(run):
            say(f"{cell}: fit{' (resuming ' + str(run) + ')' if run else ''}")
            rc = self.call("fit", cell, ["--ckpt_path", "last"] if run else [])
            run = run_folder(base)
            if rc != 0 or not finished(run):
                return self.ended(cell, "fit", rc)
        (base / RECORD).unlink(missing_ok=True)
        shutil.rmtree(run / "test", ignore_errors=True)  # a test of an earlier state, or one cut short
        result: dict[str, Any] = {"device": device_name(run)}
        for key, more in (("test_acc", []), ("test_acc_tta", ["--model.tta_flip", "true"]))[: 1 + self.args.tta]:
            before = set(events.files(run / "test"))
            rc = self.call("test", cell, ["--ckpt_path", str(run), *more])
            new = [f for f in events.files(run / "test") if f not in before]
            if rc != 0:
                return self.ended(cell, "test", rc)
            if len(new) != 1:
                say(f"{cell}: the test wrote {len(new)} event files in {run / 'test'}, not 1")
                return "failed (test events)"
            series = events.scalars(new[0])
            result[key] = last(series, "test/acc")
            if key == "test_acc":
                result["ece"] = last(series, "test/ece")
        tmp = base / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(result))
        tmp.replace(base / RECORD)  # whole or absent: a cell stopped here is tested again
        say(f"{cell}: done, test acc {result['test_acc']:.2%}")
        return "done"

    def execute(self, cells: list[Cell]) -> dict[Cell, str]:
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            with ThreadPoolExecutor(self.args.parallel) as pool:
                futures = {cell: pool.submit(self.run, cell) for cell in cells}
                pending = set(futures.values())
                while pending:  # a timeout, so that the main thread takes signals while it waits
                    pending = wait(pending, timeout=0.5).not_done
            return {cell: f.result() for cell, f in futures.items()}
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


# -- the tables -----------------------------------------------------------------------------------------------
def row(cell: Cell, status: str, out: Path) -> dict[str, Any]:
    run = run_folder(cell.base(out))
    r: dict[str, Any] = {"arm": cell.arm, "seed": cell.seed, "status": status, "run": str(run or ""), "curve": []}
    if run is not None:
        series, seconds = events.read_run(run)
        epochs = [v for _, v, _ in series.get("epoch", [])]
        r.update(epochs=int(max(epochs)) + 1 if epochs else None, curve=events.curve(series),
                 precision=config(run).get("trainer", {}).get("precision"),
                 train_wall_s=round(seconds, 1) if seconds is not None else None,
                 interruptions=max(len(events.files(run)) - 1, 0))
    if status == "done":
        r.update(record(cell.base(out)))
    return r


def spread(values: list[float], difference: bool = False) -> str:
    """Mean ± half range (max - min) / 2 over the seeds: accuracies in %, differences of them in points."""
    if not values:
        return ""
    mean = statistics.mean(values)
    text = f"{100 * mean:+.2f}" if difference else f"{mean:.2%}"
    return text + (f" ± {100 * (max(values) - min(values)) / 2:.2f}" if len(values) > 1 else "")


def summary(rows: list[dict[str, Any]], recipes: dict[str, str]) -> list[str]:
    arms = list(recipes)
    by_arm = {a: {r["seed"]: r for r in rows if r["arm"] == a and r.get("test_acc") is not None} for a in arms}
    first = by_arm[arms[0]]
    lines = [f"| arm | recipes | seeds tested | test acc | test acc, TTA | ECE | vs {arms[0]} (points) |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        got = by_arm[arm]
        paired = [got[s]["test_acc"] - first[s]["test_acc"] for s in got if s in first]
        tta = [r["test_acc_tta"] for r in got.values() if r.get("test_acc_tta") is not None]
        ece = [r["ece"] for r in got.values() if r.get("ece") is not None]
        lines.append(f"| {arm} | {recipes[arm]} | {', '.join(map(str, got)) or '-'} | "
                     f"{spread([r['test_acc'] for r in got.values()])} | {spread(tta)} | "
                     f"{f'{statistics.mean(ece):.4f}' if ece else ''} | "
                     f"{spread(paired, difference=True) if arm != arms[0] else ''} |")
    return lines


def write_tables(args: argparse.Namespace, extra: list[str], cells: list[Cell], status: dict[Cell, str]) -> None:
    rows = [row(c, status[c], args.out) for c in cells]
    with (args.out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: "" if r.get(k) is None else r[k] for k in COLUMNS} for r in rows)
    recipes = {c.arm: ", ".join(p.stem if p.parent == packaged_recipes() else str(p) for p in c.recipes)
               for c in cells}
    text = [f"Grid in {args.out}, {time.strftime('%Y-%m-%d')}: arms {', '.join(recipes)} x seeds "
            f"{' '.join(map(str, args.seeds))}" + (f"; flags for every cell: `{shlex.join(extra)}`" if extra else "")
            + ". Test metrics of the last checkpoint; ± is the half range (max - min) / 2 over the seeds; the "
            "difference from the first arm is paired by seed. Each cell: results.csv.", "", *summary(rows, recipes)]
    (args.out / "results.md").write_text("\n".join(text) + "\n")
    arms = list(recipes)
    curves = {f"{r['arm']} s{r['seed']}": r["curve"] for r in rows if r["curve"]}
    styles = {f"{r['arm']} s{r['seed']}": {"color": f"C{arms.index(r['arm']) % 10}",
                                           "linestyle": ("-", "--", ":", "-.")[args.seeds.index(r["seed"]) % 4]}
              for r in rows}
    if not events.plot(curves, args.out / "val_acc.png", "validation accuracy", styles):
        say("matplotlib is not installed: no val_acc.png (pip install matplotlib)")


def main(argv: list[str] | None = None) -> int:
    args, extra, cells = parse(list(sys.argv[1:] if argv is None else argv))
    from cutmix_pl import cifar

    try:
        if cifar.find(args.data_dir) is None:
            say(f"no CIFAR-10 in {args.data_dir}: downloading it once for every cell")
            cifar.download(args.data_dir)
    except cifar.DataError as err:
        fail(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    status = Grid(args, extra).execute(cells)
    write_tables(args, extra, cells, status)
    print((args.out / "results.md").read_text())
    bad = [f"{c} {s}" for c, s in status.items() if s != "done"]
    if bad:
        say(f"not done: {', '.join(bad)}; the same command resumes them")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

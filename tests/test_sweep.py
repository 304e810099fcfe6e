"""scripts/sweep.py and scripts/gpu_suite.py on tiny synthetic data: the table and CSV, the images/s arithmetic, the
budget, resuming with --reuse (after removed outputs and after a real SIGTERM mid-fit), the throughput maths, and
the GPU suite's smoke mode end to end."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from contextlib import chdir
from pathlib import Path

import pytest
import yaml

from test_scripts import SCRIPTS, assert_png, load

SMOKE = ["--grid", "smoke", "--parallel", "2", "--threads", "1", "--quiet"]


def sweep_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--out", str(out), *SMOKE, *extra]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def event_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def swept(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The smoke grid (CutMix and no mixing, seed 0, 2 epochs of 3 batches), 2 processes at once; --out relative to
    the working folder (the runs start in --out, so every path they are given must be absolute)."""
    base = tmp_path_factory.mktemp("sweep")
    with chdir(base):
        rows = load("sweep").main(sweep_args(tiny_cifar, Path("out")))
    return base / "out", rows


def test_sweep_writes_one_row_per_run_with_metrics_in_range(swept):
    out, rows = swept
    sweep = load("sweep")
    assert [r["name"] for r in rows] == ["smoke-cutmix-s0", "smoke-baseline-s0"]
    assert [(r["method"], r["seed"], r["setting"], r["status"]) for r in rows] == [
        ("cutmix", 0, "smoke", "done"), ("baseline", 0, "smoke", "done")]
    for r in rows:
        assert 0.0 <= r["test_acc"] <= r["test_top5"] <= 1.0 and 0.0 <= r["test_ece"] <= 1.0
        assert len(r["val_acc_curve"]) == 2 and all(0.0 <= v <= 1.0 for v in r["val_acc_curve"])
        folder = out / "runs" / r["name"] / "version_0"
        assert (folder / "FINISHED").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
        assert len(event_files(folder / "test")) == 1
        ledger = json.loads((out / "runs" / r["name"] / "sweep.json").read_text())
        assert [e["rc"] for e in ledger["fit"]] == [0] and [e["rc"] for e in ledger["test"]] == [0]
        assert r["fit_minutes"] == pytest.approx(ledger["fit"][0]["seconds"] / 60)
        # the test accuracy is the one in the test run's own events
        test = sweep.scalars(event_files(folder / "test")[0])
        assert r["test_acc"] == pytest.approx(test["test/acc"][-1][1])
    # the CSV holds the same rows and numbers
    table = read_csv(out / "results.csv")
    assert [t["name"] for t in table] == [r["name"] for r in rows]
    for t, r in zip(table, rows):
        assert t["status"] == "done" and float(t["test_acc"]) == pytest.approx(r["test_acc"])
        assert float(t["images_per_s"]) == pytest.approx(r["images_per_s"])
        assert t["configs"] == "smoke.yaml" and "--trainer.max_epochs 2" in t["flags"]
    md = (out / "results.md").read_text()
    assert f"| smoke-cutmix-s0 | cutmix | 0 | smoke | done | {rows[0]['test_acc']:.2%} |" in md
    assert "| baseline | smoke | 1 | 1 (0) |" in md  # the summary over seeds: one tested seed per method
    assert_png(out / "val_acc.png", (300, 200))


def test_images_per_second_is_images_between_logged_steps_over_their_time(swept):
    out, rows = swept
    sweep = load("sweep")
    folder = out / "runs" / rows[0]["name"] / "version_0"
    # 640 training images - 100 held out = 540; 3 batches of 32 an epoch (limit_train_batches 3)
    assert sweep.images_per_step(folder) == 32
    lr = sweep.scalars(event_files(folder)[0])["train/lr"]  # logged every step: global steps 0 .. 5
    assert [s for s, _, _ in lr] == list(range(6))
    assert rows[0]["images_per_s"] == pytest.approx(5 * 32 / (lr[-1][2] - lr[0][2]))


def test_epoch_images_follow_the_data_module_and_lightning_rules():
    epoch = load("sweep").epoch_images_and_steps

    def cfg(batch, limit=None, val=0, train_size=None):
        return {"data": {"batch_size": batch, "val_size": val, "train_size": train_size},
                "trainer": {"limit_train_batches": limit}}

    assert epoch(cfg(128, val=5000), 50000) == (45000, 352)  # a short last batch of 72 counts as it is
    assert epoch(cfg(512, 1.0, val=5000), 50000) == (45000, 88)  # 1.0 is a fraction: every batch
    assert epoch(cfg(32, 3.0, val=100), 640) == (96, 3)  # a whole float above 1 is a count
    assert epoch(cfg(32, 0.5), 640) == (320, 10)  # a fraction of the 20 batches
    assert epoch(cfg(10), 21) == (20, 2)  # a lone last image waits for the next epoch
    assert epoch(cfg(64, train_size=100), 1000) == (100, 2)


def test_reuse_redoes_only_the_removed_parts_and_gives_the_same_results(swept, tiny_cifar, tmp_path):
    src, before = swept
    out = tmp_path / "copy"
    shutil.copytree(src, out)  # leave the module's sweep as it was
    cutmix, baseline = (out / "runs" / n / "version_0" for n in ("smoke-cutmix-s0", "smoke-baseline-s0"))
    shutil.rmtree(cutmix / "test")  # as if the sweep had stopped before this test
    (baseline / "FINISHED").unlink()  # as if the fit had been killed after its last checkpoint
    sweep = load("sweep")
    with pytest.raises(SystemExit, match="already holds smoke-cutmix-s0, smoke-baseline-s0; fix: pass --reuse"):
        sweep.main(sweep_args(Path("unused"), out))
    after = sweep.main(sweep_args(tiny_cifar, out, "--reuse"))
    assert [r["status"] for r in after] == ["done (test rerun)", "done (resumed)"]
    # cutmix: the fit was not run again, only its test
    assert len(event_files(cutmix)) == 1 and not (cutmix / "config.resume1.yaml").exists()
    ledger = json.loads((out / "runs" / "smoke-cutmix-s0" / "sweep.json").read_text())
    assert len(ledger["fit"]) == 1 and len(ledger["test"]) == 2
    # baseline: the fit continued in its own folder from last.ckpt (a resume, not a new run), then a fresh test
    ledger = json.loads((out / "runs" / "smoke-baseline-s0" / "sweep.json").read_text())
    assert [e["resumed"] for e in ledger["fit"]] == [False, True] and len(ledger["test"]) == 2
    assert (baseline / "config.resume1.yaml").is_file() and (baseline / "FINISHED").is_file()
    assert sorted(p.name for p in (out / "runs" / "smoke-baseline-s0").iterdir() if p.is_dir()) == ["version_0"]
    assert len(event_files(baseline / "test")) == 1  # the stale test was replaced, not added to
    for b, a in zip(before, after):
        assert a["test_acc"] == b["test_acc"] and a["test_ece"] == pytest.approx(b["test_ece"])
        assert a["val_acc_curve"][:2] == pytest.approx(b["val_acc_curve"])
    # a third --reuse has nothing left to do: no process is started
    again = sweep.main(sweep_args(tiny_cifar, out, "--reuse"))
    assert [r["status"] for r in again] == ["done (reused)", "done (reused)"]
    assert len(json.loads((out / "runs" / "smoke-cutmix-s0" / "sweep.json").read_text())["test"]) == 2


def test_no_test_takes_a_finished_fit_as_done_and_starts_no_test(swept, tiny_cifar, tmp_path):
    src, before = swept
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    shutil.rmtree(out / "runs" / "smoke-cutmix-s0" / "version_0" / "test")  # its fit is finished, its test gone
    rows = load("sweep").main(sweep_args(tiny_cifar, out, "--reuse", "--no-test"))
    assert [r["status"] for r in rows] == ["done (reused)", "done (reused)"]
    assert rows[0]["test_acc"] is None and rows[1]["test_acc"] == before[1]["test_acc"]
    assert rows[0]["fit_minutes"] == pytest.approx(before[0]["fit_minutes"])  # its fit's time, from the ledger
    assert not (out / "runs" / "smoke-cutmix-s0" / "version_0" / "test").exists()
    ledger = json.loads((out / "runs" / "smoke-cutmix-s0" / "sweep.json").read_text())
    assert len(ledger["fit"]) == 1 and len(ledger["test"]) == 1  # no process was started
    assert "Fits only (--no-test): no test metrics." in (out / "results.md").read_text()


def test_a_tiny_budget_starts_nothing_and_lists_every_run_as_not_run(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "budget"
    rows = load("sweep").main(sweep_args(tiny_cifar, out, "--budget-minutes", "0.01"))
    assert [r["status"] for r in rows] == ["not run (budget)"] * 2
    assert all(r["test_acc"] is None and r["fit_minutes"] is None for r in rows)
    assert not (out / "runs").exists()
    assert [t["status"] for t in read_csv(out / "results.csv")] == ["not run (budget)"] * 2
    assert (out / "results.md").read_text().count("| not run (budget) |") == 2
    # the preset's 0.3 min alone, x 2 processes sharing the machine (no --speedup: sharing assumed to gain nothing)
    assert "smoke-cutmix-s0 not run: estimated 0.6 min, 0.0 min of the budget left" in capsys.readouterr().out


def test_the_estimate_scales_the_preset_minutes_and_then_learns_from_finished_runs():
    sweep = load("sweep")
    args = argparse.Namespace(parallel=4, speedup=2.0, budget_minutes=10.0)
    s = sweep.Sweep(args, [])
    a = sweep.Run("cutmix", 0, "a", minutes=6.0)
    b = sweep.Run("baseline", 0, "b", minutes=12.0)
    unknown = sweep.Run("cutmix", 0, "c")
    # before any run finished: K / speedup = 4 / 2 processes' worth of slow-down
    assert s.estimate(a) == pytest.approx(12.0) and s.estimate(unknown) is None
    # fewer runs left than K: only those share the machine; their speed-up grows linearly from 1 alone to 2 at K = 4
    assert [s.estimate(a, k) for k in (1, 2, 3, 4)] == pytest.approx([6.0, 9.0, 10.8, 12.0])
    assert sweep.slowdown(3, 1, 5.0) == 3.0 and sweep.slowdown(1, 1, 1.0) == 1.0
    s.done.append((a, 9.0))  # a took 9 minutes: 1.5x its preset estimate, under this sweep's sharing
    assert s.estimate(b) == pytest.approx(18.0) and s.estimate(unknown) == pytest.approx(9.0)
    s.done.append((unknown, 3.0))  # a run without a preset estimate does not change the factor
    assert s.estimate(b) == pytest.approx(18.0) and s.estimate(unknown) == pytest.approx(6.0)


def test_prior_results_are_taken_over_and_not_rerun_unless_their_flags_differ(swept, tiny_cifar, tmp_path, capsys):
    src, before = swept
    sweep = load("sweep")
    out = tmp_path / "next-lease"
    after = sweep.main(sweep_args(tiny_cifar, out, "--prior", str(src / "results.csv")))
    assert not (out / "runs").exists()  # nothing was run
    assert [r["status"] for r in after] == ["done (earlier: results.csv)"] * 2
    for a, b in zip(after, before):
        assert (a["name"], a["seed"], a["flags"]) == (b["name"], b["seed"], b["flags"])
        assert a["test_acc"] == pytest.approx(b["test_acc"]) and a["fit_minutes"] == pytest.approx(b["fit_minutes"])
    assert "2 run(s) taken from earlier sweeps" in (out / "results.md").read_text()
    assert [r["device"] for r in read_csv(out / "results.csv")] == [b["device"] for b in before] != [""] * 2
    # a table written before the device and date columns existed is read and written back without them
    old = tmp_path / "old.csv"
    old.write_text("\n".join(",".join(line.split(",")[:-2]) for line in (src / "results.csv").read_text().splitlines()))
    assert [r["status"] for r in sweep.main(sweep_args(tiny_cifar, tmp_path / "o", "--prior", str(old)))] == [
        "done (earlier: old.csv)"] * 2
    # the runs of --out itself, done and tested, win over the earlier table's
    mine = tmp_path / "mine"
    shutil.copytree(src, mine)
    assert [r["status"] for r in sweep.main(sweep_args(tiny_cifar, mine, "--reuse", "--prior", str(old)))] == [
        "done (reused)"] * 2
    # flags given to every run count: a run made without them is another experiment
    capsys.readouterr()
    more = sweep.main(sweep_args(tiny_cifar, tmp_path / "m", "--prior", str(old), "--budget-minutes", "0.01",
                                 "--model.optimizer.init_args.lr", "0.5"))
    assert [r["status"] for r in more] == ["not run (budget)"] * 2
    assert "smoke-cutmix-s0 in" in capsys.readouterr().out
    # a run made with other flags is another experiment: it is run again (here the budget leaves it out)
    rows = read_csv(src / "results.csv")
    rows[1]["flags"] += " --model.optimizer.init_args.lr 0.5"
    changed = tmp_path / "changed.csv"
    with changed.open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    capsys.readouterr()
    again = sweep.main(sweep_args(tiny_cifar, tmp_path / "other", "--prior", str(changed), "--budget-minutes", "0.01"))
    assert [r["status"] for r in again] == ["done (earlier: changed.csv)", "not run (budget)"]
    assert f"smoke-baseline-s0 in {changed} ran with other configs or flags: run again" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--prior .*missing.csv: no such file"):
        sweep.main(sweep_args(tiny_cifar, tmp_path / "x", "--prior", str(tmp_path / "missing.csv")))


def test_work_left_is_what_a_run_folder_still_needs(swept, tmp_path):
    sweep = load("sweep")
    copy = tmp_path / "runs"
    shutil.copytree(swept[0] / "runs", copy)
    folder = copy / "smoke-cutmix-s0" / "version_0"
    assert sweep.work_left(folder) == 0.0 and sweep.work_left(tmp_path / "none") == 1.0
    shutil.rmtree(folder / "test")
    assert sweep.work_left(folder) == 0.1  # the test alone
    (folder / "FINISHED").unlink()  # a fit stopped after its last checkpoint: epoch 1 of 2 logged
    assert sweep.work_left(folder) == pytest.approx(0.5)
    (folder / "checkpoints" / "last.ckpt").unlink()  # nothing to resume from: a whole run
    assert sweep.work_left(folder) == 1.0


def test_the_engine_puts_its_flags_after_each_runs_own_and_renames_the_setting(capsys):
    sweep = load("sweep")
    plain = sweep.PRESETS["gpu-results"]
    runs = sweep.with_engine(plain)
    assert [r.setting for r in runs] == [f"{r.setting}-graphs" for r in plain]
    assert [r.flags for r in runs] == [(*r.flags, *sweep.ENGINE) for r in plain]
    assert runs[0].name == "fast-200ep-graphs-cutmix-s0"
    assert set(sweep.ENGINE[1::2]) <= {"true", "reduce-overhead"}
    sweep.main(["--grid", "gpu-results", "--engine", "graphs", "--estimate-scale", "0.5", "--list"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("fast-200ep-graphs-cutmix-s0:") and first.endswith(
        "--trainer.max_epochs 200 --data.compile_transform true --data.drop_last true --model.compile reduce-overhead"
        "  (~3.25 min alone)")


@pytest.mark.parametrize("flag, value, says", [
    ("--parallel", "0", "--parallel must be >= 1, got 0; fix: pass --parallel 1"),
    ("--estimate-scale", "0", "--estimate-scale must be > 0, got 0; fix: pass a run's measured minutes"),
    ("--estimate-scale", "-2", "--estimate-scale must be > 0, got -2; fix:"),
])
def test_bad_sweep_arguments_are_refused_in_one_line_before_anything_runs(flag, value, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        load("sweep").main(["--grid", "smoke", "--out", str(tmp_path / "out"), flag, value, "--list"])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("minutes, smoke, stretch", [(None, True, 1.0), ("5", True, 5 / 3), ("2", True, 1.0),
                                                      (None, False, 1.0), ("18", False, 2.0)])
def test_a_longer_suite_stretches_every_step_limit_in_proportion(minutes, smoke, stretch, tmp_path):
    suite = load("gpu_suite")
    argv = ["--out", str(tmp_path / "out"), *(["--smoke"] if smoke else []), *(["--minutes", minutes] if minutes else [])]
    assert suite.Suite(suite.parse(argv)).stretch == pytest.approx(stretch)


def test_a_suite_without_time_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        load("gpu_suite").main(["--smoke", "--minutes", "0", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "--minutes must be > 0, got 0; fix: leave it out" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def _fake_run(folder: Path, data: Path, steps_walls: list[tuple[int, float]], batch: int = 32) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "data": {"data_dir": str(data), "batch_size": batch, "val_size": 0, "train_size": None},
        "trainer": {"limit_train_batches": None}}))
    with SummaryWriter(str(folder)) as w:
        for step, wall in steps_walls:
            w.add_scalar("train/lr", 0.1, step, walltime=wall)
    return folder


def test_throughput_of_concurrent_runs_is_measured_where_all_of_them_train(tiny_cifar, tmp_path):
    sweep = load("sweep")
    # 640 images in batches of 32: 20 steps of 32 images an epoch
    alone = _fake_run(tmp_path / "alone", tiny_cifar, [(0, 100.0), (10, 110.0), (20, 120.0)])
    assert sweep.train_rate(alone) == pytest.approx(20 * 32 / 20.0)
    # two runs sharing the machine: one 10 steps in 10 s from t=0, the other 10 steps in 10 s from t=5
    r1 = _fake_run(tmp_path / "r1", tiny_cifar, [(0, 0.0), (10, 10.0)])
    r2 = _fake_run(tmp_path / "r2", tiny_cifar, [(0, 5.0), (10, 15.0)])
    total, overlap = sweep.aggregate_rate([r1, r2])
    # in [5, 10] each did 5 steps: 2 x 5 x 32 images in 5 s; the interval is half a run's window
    assert total == pytest.approx(2 * 5 * 32 / 5.0) and overlap == pytest.approx(0.5)
    r3 = _fake_run(tmp_path / "r3", tiny_cifar, [(0, 20.0), (10, 30.0)])  # never ran at the same time as r1
    assert sweep.aggregate_rate([r1, r3]) == (None, 0.0)


@pytest.mark.slow(seconds=45)
def test_a_sigterm_mid_fit_is_passed_on_and_reuse_resumes_to_the_uninterrupted_result(tiny_cifar, tmp_path):
    longer = ["--only", "smoke-cutmix", "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "8"]
    reference = load("sweep").main(sweep_args(tiny_cifar, tmp_path / "ref", *longer))
    out = tmp_path / "cut"
    run = out / "runs" / "smoke-cutmix-s0" / "version_0"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "sweep.py"), *sweep_args(tiny_cifar, out, *longer)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.ckpt").is_file():  # epoch 0 is over: stop it during epoch 1
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, output
    assert "interrupted: smoke-cutmix-s0" in output
    assert read_csv(out / "results.csv")[0]["status"] == "interrupted"
    ledger = json.loads((out / "runs" / "smoke-cutmix-s0" / "sweep.json").read_text())
    assert [e["rc"] for e in ledger["fit"]] == [128 + signal.SIGTERM] and ledger["test"] == []
    assert not (run / "FINISHED").exists() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "cutmix-pl: stopped by SIGTERM after global step" in (run.parent / "fit.log").read_text()
    resumed = load("sweep").main(sweep_args(tiny_cifar, out, *longer, "--reuse"))
    assert resumed[0]["status"] == "done (resumed)"
    assert resumed[0]["test_acc"] == reference[0]["test_acc"]
    assert resumed[0]["test_ece"] == pytest.approx(reference[0]["test_ece"], abs=1e-6)
    assert resumed[0]["val_acc_curve"] == pytest.approx(reference[0]["val_acc_curve"], abs=1e-6)


# The smoke suite takes under its default 3 minutes on an idle 2-core CPU (docs/speed.md); the test gives it 5, which
# stretches every step's limit by 5/3, so that a busy or slower CI machine does not fail it on time alone.
SMOKE_MINUTES = 5


@pytest.mark.slow(seconds=150)
def test_gpu_suite_smoke_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "suite"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_suite.py"), "--smoke", "--minutes", str(SMOKE_MINUTES),
                           "--out", str(out)], capture_output=True, text=True, timeout=60 * SMOKE_MINUTES + 60, env=env)
    seconds = time.monotonic() - start
    print(f"gpu_suite --smoke: {seconds:.0f} s")  # reported with -s
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert seconds < 60 * SMOKE_MINUTES
    report = json.loads((out / "suite.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["env", "data", "engine200", "pytest", "bench_augment", "bench_train", "bench_fit", "ddp",
                           "bench_randaugment", "throughput", "sweep"]
    assert all(s["status"] == "passed" for s in steps.values()) and report["ok"] is True
    assert all(s["seconds"] <= s["limit"] for s in steps.values())
    assert steps["engine200"]["limit"] == pytest.approx(60 * SMOKE_MINUTES / 3)  # 60 s at the default 3 minutes
    assert "8 skipped" in steps["pytest"]["figures"] or "skipped (of" in steps["pytest"]["figures"]
    assert "2 ranks" in steps["ddp"]["figures"] and "backend gloo" in steps["ddp"]["figures"]
    assert "parameters identical" in steps["ddp"]["figures"]
    assert "fit / fixed-batch step" in steps["bench_fit"]["figures"]
    assert "cold start: a 1-epoch fit" in steps["engine200"]["figures"]
    probe = out / "work" / "steps" / "engine200" / "probe"  # the cold start: a fit alone, never tested
    assert [r["status"] for r in read_csv(probe / "results.csv")] == ["done"]
    assert not (probe / "runs" / "smoke-graphs-cutmix-s0" / "version_0" / "test").exists()
    assert "smoke-graphs-cutmix-s0: fit" in steps["engine200"]["figures"]
    # the summary is printed last and saved
    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip())
    assert summary.count("| passed |") == len(steps) == 11 and "all steps passed" in summary
    assert report["env"]["torch"] and report["env"]["lightning"] and report["env"]["device"] == "CPU"
    # the device machine returns <= 8 files, none deeper than $OUT/a/b/file: everything else must be deeper
    returned = [p for p in out.rglob("*") if p.is_file() and len(p.relative_to(out).parts) <= 3]
    assert sorted(p.name for p in returned) == ["logs.tar.gz", "results.csv", "results.md", "suite.json",
                                                "summary.md", "throughput.md", "val_acc.png"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pytest/junit.xml", "ddp/report/rank0.json", "ddp/report/rank1.json", "sweep/results.csv",
            "bench_train/bench_train.json", "bench_randaugment/bench_randaugment.json", "bench_fit/bench_fit.json",
            "throughput/throughput.json"} <= names
    assert not any(n.endswith(".ckpt") or n.startswith("data/") for n in names)
    ranks = [json.loads((out / "work" / "steps" / "ddp" / "report" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    # engine200 ran the grid's first run on the engine (drop_last; nothing compiled in smoke), the sweep reused it
    rows = read_csv(out / "results.csv")
    assert [(r["name"], r["status"]) for r in rows] == [("smoke-graphs-cutmix-s0", "done (reused)"),
                                                         ("smoke-graphs-baseline-s0", "done")]
    assert all(0 <= float(r["test_acc"]) <= 1 for r in rows)
    config = yaml.safe_load((out / "work" / "steps" / "sweep" / "runs" / "smoke-graphs-cutmix-s0" / "version_0"
                             / "config.yaml").read_text())
    assert config["data"]["drop_last"] is True and config["trainer"]["max_epochs"] == 2
    throughput = json.loads((out / "work" / "steps" / "throughput" / "throughput.json").read_text())
    assert throughput["processes"] == 2 and throughput["ratio"] > 0 and len(throughput["x2"]["each"]) == 2
    # a second call on the same --work (as on a still-warm GPU machine) gives the sweep what the first measured
    state = json.loads((out / "work" / "steps" / "suite" / "state.json").read_text())
    assert state["engine"] == "graphs" and state["speedup"] == throughput["ratio"] and state["engine_scale"] > 0
    again = subprocess.run([sys.executable, str(SCRIPTS / "gpu_suite.py"), "--smoke", "--steps", "sweep",
                            "--minutes", str(SMOKE_MINUTES), "--out", str(tmp_path / "again"),
                            "--work", str(out / "work" / "steps")],
                           capture_output=True, text=True, timeout=60 * SMOKE_MINUTES + 60, env=env)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    step = {s["name"]: s for s in json.loads((tmp_path / "again" / "suite.json").read_text())["steps"]}["sweep"]
    assert "2 done (reused)" in step["figures"] and "graphs)" in step["figures"]

"""scripts/grid.py: its arguments, the summary over seeds, and a real grid on tiny data: an interrupted cell
resumed in its own run, finished cells skipped, the tables holding the tests' own metrics."""

from __future__ import annotations

import csv
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli_runs import ckpt, files_under, small
from cutmix_pl import runs
from cutmix_pl.cli import CONFIG_DIR
from cutmix_pl.cli import main as cli_main
from cutmix_pl.module import ImageClassifier

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import grid  # noqa: E402


def last_values(path: Path) -> dict[str, float]:
    """The last value of every scalar in one event file."""
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
    return {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]}


def walls(folder: Path) -> list[list[float]]:
    """The wall times of every scalar, one list per event file of the folder."""
    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
        out.append([e.wall_time for t in acc.Tags()["scalars"] for e in acc.Scalars(t)])
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("argv, says", [
    (["--arm", "cutmix"], "--arm cutmix: give NAME=RECIPE[,RECIPE...]"),
    (["--arm", "a=smoke,nosuch"],
     "recipe 'nosuch' is neither a file nor a packaged recipe (baseline, cifar100, cutmix,"),
    (["--arm", "a=smoke", "--arm", "a=short"], "--arm a is given twice; fix:"),
    (["--arm", "a=smoke", "--seeds", "0", "1", "0"], "--seeds 0 1 0 repeats a seed; fix:"),
    (["--arm", "a=smoke", "--parallel", "0"], "--parallel 0 / --threads None: both must be >= 1; fix:"),
    (["--arm", "a=smoke", "--", "--ckpt_path=last"], "--ckpt_path after -- is set by the grid for each cell; fix:"),
    (["--arm", "../a=smoke"], "--arm ../a=smoke: give NAME=RECIPE"),
    ([], "the following arguments are required: --arm; fix:"),
])
def test_bad_arguments_are_refused_in_one_line_before_anything_is_written(argv, says, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        grid.main(["--out", str(out), "--data-dir", str(tmp_path / "data"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cutmix-pl: error: ") and says in err[0], err
    assert not out.exists() and not (tmp_path / "data").exists()


def test_recipes_are_files_or_packaged_names_and_cells_go_seed_by_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("data:\n  train_size: 5000\n")
    args, extra, cells = grid.parse(["--out", "o", "--data-dir", "d", "--arm", "a=short", "--arm",
                                     "b=short,mine.yaml", "--seeds", "1", "0", "--", "--trainer.max_epochs", "3"])
    assert [(c.arm, c.seed) for c in cells] == [("a", 1), ("b", 1), ("a", 0), ("b", 0)]
    assert cells[1].recipes == (CONFIG_DIR / "short.yaml", tmp_path / "mine.yaml")  # a relative path made absolute
    assert (args.out, args.data_dir, extra) == (tmp_path / "o", tmp_path / "d", ["--trainer.max_epochs", "3"])
    assert cells[1].base(args.out) == tmp_path / "o" / "b" / "s1"


def test_the_summary_gives_mean_and_half_range_per_arm_and_the_difference_paired_by_seed():
    rows = [{"arm": "a", "seed": 0, "test_acc": 0.70, "test_acc_tta": 0.71, "ece": 0.02},
            {"arm": "a", "seed": 1, "test_acc": 0.72, "test_acc_tta": 0.74, "ece": 0.04},
            {"arm": "b", "seed": 0, "test_acc": 0.66, "ece": 0.05},
            {"arm": "b", "seed": 1, "test_acc": 0.67, "ece": 0.07},
            {"arm": "b", "seed": 2, "test_acc": 0.90, "ece": 0.09},  # a has no seed 2: not in the difference
            {"arm": "c", "seed": 0, "test_acc": None}]  # not tested
    lines = grid.summary(rows, {"a": "short", "b": "short, baseline", "c": "short, mixup"})
    assert lines[2:] == [
        "| a | short | 0, 1 | 71.00% ± 1.00 | 72.50% ± 1.50 | 0.0300 |  |",
        "| b | short, baseline | 0, 1, 2 | 74.33% ± 12.00 |  | 0.0700 | -4.50 ± 0.50 |",
        "| c | short, mixup | - |  |  |  |  |"]


def test_a_stop_reaches_the_running_commands_once_then_kills_them_and_starts_nothing_more(tmp_path, monkeypatch):
    args, extra, cells = grid.parse(["--out", str(tmp_path), "--data-dir", str(tmp_path), "--arm", "a=smoke",
                                     "--seeds", "0", "1", "2", "--parallel", "2"])
    # each command notes the signals it gets and goes on running (as a fit still saving would)
    child = ("import pathlib, signal, time; signal.signal(signal.SIGTERM, lambda s, f: pathlib.Path('got').open('a')"
             ".write(f'{s} ')); pathlib.Path('ready').touch(); time.sleep(120)")
    runner = grid.Grid(args, extra)
    monkeypatch.setattr(runner, "command", lambda sub, cell, more: [sys.executable, "-c", child])
    first, second = (c.base(tmp_path) for c in cells[:2])

    def stop_twice() -> None:  # Ctrl-C, and once the commands took it, Ctrl-C again
        for files in (["ready"], ["got"]):
            while not all((b / f).is_file() for b in (first, second) for f in files):
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=stop_twice, daemon=True).start()
    status = runner.execute(cells)
    assert list(status.values()) == ["interrupted", "interrupted", "not run"]
    assert [(b / "got").read_text() for b in (first, second)] == [f"{signal.SIGTERM.value} "] * 2
    assert not cells[2].base(tmp_path).exists() and not any(tmp_path.rglob(grid.RECORD))


@pytest.mark.slow(seconds=60)
def test_a_grid_resumes_an_interrupted_cell_skips_finished_ones_and_tables_the_tests_metrics(
        tiny_cifar, tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid"
    # small() brings its own --config smoke.yaml (which names the logger "smoke"): the cells' runs must stay put
    argv = ["--out", str(out), "--data-dir", str(tiny_cifar), "--arm", "cutmix=smoke", "--arm",
            "baseline=smoke,baseline", "--parallel", "2", "--threads", "1", "--tta", "--", *small(tiny_cifar)]
    # cutmix s0 was stopped mid-fit: its fit command, as the grid runs it, sent SIGTERM after step 3 of 12 (the
    # batch under way ends, then last.ckpt is saved)
    args, extra, (cutmix, baseline) = grid.parse(argv)
    base = cutmix.base(out)
    fit = grid.Grid(args, extra).command("fit", cutmix, [])
    assert fit[1:4] == ["-m", "cutmix_pl", "fit"]
    with monkeypatch.context() as m:
        m.setattr(ImageClassifier, "on_train_batch_end", lambda self, *_: self.global_step == 3 and os.kill(
            os.getpid(), signal.SIGTERM), raising=False)
        with pytest.raises(SystemExit) as stopped:
            cli_main(fit[3:])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert ckpt(base / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 4

    capsys.readouterr()
    assert grid.main(argv) == 0, capsys.readouterr().out[-3000:]
    rows = read_csv(out / "results.csv")
    assert [(r["arm"], r["seed"], r["status"]) for r in rows] == [("cutmix", "0", "done"), ("baseline", "0", "done")]
    metrics = {}
    for r in rows:
        run = out / r["arm"] / "s0" / "version_0"
        assert r["run"] == str(run)
        assert ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 12  # 2 epochs of 6 steps
        assert (r["epochs"], r["precision"], r["device"]) == ("2", "32-true", f"CPU ({os.cpu_count()} cores)")
        assert r["interruptions"] == {"cutmix": "1", "baseline": "0"}[r["arm"]]
        plain, tta = map(last_values, sorted((run / "test").glob("events.out.tfevents.*")))
        assert float(r["test_acc"]) == plain["test/acc"] and float(r["ece"]) == plain["test/ece"]
        assert float(r["test_acc_tta"]) == tta["test/acc"]
        metrics[r["arm"]] = plain["test/acc"], tta["test/acc"], plain["test/ece"]
    # the interrupted fit went on in its own run folder (a resume, not a new run); the pause between its two
    # processes is not training time
    run = base / "version_0"
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == ["version_0"]
    assert (run / "config.resume1.yaml").is_file() and runs.is_finished(run)
    assert "cutmix-pl: resuming" in (base / "fit.log").read_text()
    first, second = walls(run)
    assert max(second) - min(second) <= float(rows[0]["train_wall_s"]) < max(second) - min(first)
    md = (out / "results.md").read_text()
    (c_acc, c_tta, c_ece), (b_acc, b_tta, b_ece) = metrics["cutmix"], metrics["baseline"]
    assert f"| cutmix | smoke | 0 | {c_acc:.2%} | {c_tta:.2%} | {c_ece:.4f} |  |" in md
    assert f"| baseline | smoke, baseline | 0 | {b_acc:.2%} | {b_tta:.2%} | {b_ece:.4f} | {100 * (b_acc - c_acc):+.2f} |" in md
    with Image.open(out / "val_acc.png") as im:
        assert im.format == "PNG" and im.size == (720, 480)

    # the same command again (without --tta): the finished cutmix cell is skipped, nothing of it touched; the
    # baseline cell, stopped after its fit, before its tests were recorded, is tested again
    kept = {cell: files_under(cell.base(out)) for cell in (cutmix, baseline)}
    (baseline.base(out) / grid.RECORD).unlink()
    argv.remove("--tta")
    capsys.readouterr()
    assert grid.main(argv) == 0
    printed = capsys.readouterr().out
    assert "grid: cutmix s0: finished and tested, skipped" in printed and ": fit" not in printed
    assert files_under(cutmix.base(out)) == kept[cutmix]
    trained = lambda files: {k: v for k, v in files.items()  # noqa: E731
                             if not k.startswith(("version_0/test/", "test.log", grid.RECORD))}
    assert trained(files_under(baseline.base(out))) == trained(kept[baseline])
    rows = read_csv(out / "results.csv")
    assert [float(r["test_acc"]) for r in rows] == [c_acc, b_acc]
    assert [r["test_acc_tta"] for r in rows] == [str(c_tta), ""]  # the cutmix cell's record is as it was

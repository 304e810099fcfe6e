"""The scripts run on tiny data and produce their files (the plot and grids open as PNG)."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cutmix_pl.cli import CONFIG_DIR, main as cli_main

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assert_png(path, min_size=(64, 64)):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1]


@pytest.mark.slow(seconds=45)
def test_compare_runs_three_methods_and_writes_table_and_plot(tiny_cifar, tmp_path):
    out = tmp_path / "cmp"
    settings = ["--data-dir", str(tiny_cifar), "--out", str(out), "--epochs", "2", "--quiet",
                "--trainer.accelerator", "cpu", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
                "--data.batch_size", "32", "--data.eval_batch_size", "100"]
    rows = load("compare").main(settings)
    assert [r["method"] for r in rows] == ["cutmix", "baseline", "mixup"]
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["test_ece"] <= 1.0
        assert len(r["val_acc_curve"]) == 2 and r["fit_minutes"] > 0
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 4 and "| cutmix |" in table and "| mixup |" in table
    assert json.loads((out / "results.json").read_text())[1]["method"] == "baseline"
    assert_png(out / "val_acc.png", (300, 200))
    marker = out / "runs" / "cutmix" / "version_0" / "fit_done.json"
    assert json.loads(marker.read_text())["resumed"] is False
    marker.unlink()  # as if the cutmix fit had been killed after its last checkpoint: --reuse resumes it
    again = load("compare").main([*settings, "--reuse"])  # a resume must repeat the run's settings
    assert json.loads(marker.read_text())["resumed"] is True
    # the fit time sums each process's span: the pause between the two processes (the other fits and tests ran
    # in it) is not counted, so the total is below the span from the first event to the last, whatever the load
    files = sorted(marker.parent.glob("events.out.tfevents.*"))
    assert len(files) == 2
    walls = [w for events in files for series in load("compare").scalars(events).values() for _, _, w in series]
    assert rows[0]["fit_minutes"] <= again[0]["fit_minutes"] < (max(walls) - min(walls)) / 60
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in rows]


def test_visualize_grid_and_cam(tiny_cifar, in_tmp):
    viz = load("visualize")
    grid = viz.main(["grid", "--data-dir", str(tiny_cifar), "--out", str(in_tmp / "grid.png"), "--n", "8"])
    assert_png(grid, (8 * 96, 96))
    cli = cli_main(["fit", "--config", str(CONFIG_DIR / "smoke.yaml"), "--data.data_dir", str(tiny_cifar),
                    "--data.download", "false", "--data.val_size", "100", "--data.batch_size", "32",
                    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
                    "--trainer.enable_progress_bar", "false"])
    ckpt = str(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt")
    cam = viz.main(["cam", "--data-dir", str(tiny_cifar), "--out", str(in_tmp / "cam.png"), "--n", "3",
                    "--ckpt", f"cutmix={ckpt}", "--ckpt", f"baseline={ckpt}"])
    assert_png(cam, (3 * 128, 3 * 128))


def test_bench_train_runs_and_reports_ratios(tiny_cifar, capsys):
    result = load("bench_train").main(["--data-dir", str(tiny_cifar), "--steps", "1", "--rounds", "1",
                                       "--warmup", "1", "--workers", "0", "--batch-size", "32"])
    assert result["a/b"] > 0 and result["a/c"] > 0
    out = capsys.readouterr().out
    assert "ratio a/b" in out and "ceiling" in out


def _fake_fit_run(folder, accs, start=1000.0, epoch_seconds=10.0):
    """A fit run folder whose events hold train/lr at ``start`` and one val/acc per epoch after it."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as w:
        w.add_scalar("train/lr", 0.1, 0, walltime=start)
        for i, acc in enumerate(accs):
            w.add_scalar("val/acc", acc, i, walltime=start + epoch_seconds * (i + 1))
    return folder


def test_curves_reads_runs_made_elsewhere_and_reports_when_each_threshold_is_reached(tmp_path, capsys):
    short = _fake_fit_run(tmp_path / "a" / "version_0", [0.5, 0.72, 0.9, 0.88])
    long = _fake_fit_run(tmp_path / "b" / "version_3", [0.4, 0.6, 0.65], epoch_seconds=20.0)
    out = tmp_path / "docs" / "curves.png"
    rows = load("curves").main(["--out", str(out), "--threshold", "0.7", "--threshold", "0.95",
                                f"short={short}", str(long)])
    assert_png(out)
    assert [r["method"] for r in rows] == ["short", "b"]  # unnamed: the run name above version_N
    assert rows[0]["last"] == pytest.approx(0.88) and rows[0]["best"] == pytest.approx(0.9)
    assert rows[0]["reach"][0.7] == (2, pytest.approx(20.0)) and rows[0]["reach"][0.95] is None
    assert rows[1]["reach"][0.7] is None and rows[1]["seconds"] == pytest.approx(60.0)
    printed = capsys.readouterr().out
    assert "| short | 4 | 88.00% | 90.00% | 40 s | epoch 2, 20 s | not reached |" in printed


def test_curves_rejects_a_folder_without_events_and_a_threshold_out_of_range(tmp_path, capsys):
    curves = load("curves")
    with pytest.raises(SystemExit):
        curves.main(["--out", str(tmp_path / "x.png"), str(tmp_path)])
    assert "holds no TensorBoard event file" in capsys.readouterr().err
    run = _fake_fit_run(tmp_path / "r" / "version_0", [0.5])
    with pytest.raises(SystemExit):
        curves.main(["--out", str(tmp_path / "x.png"), "--threshold", "90", str(run)])
    assert "--threshold 90.0 is out of range" in capsys.readouterr().err
    unvalidated = _fake_fit_run(tmp_path / "n" / "version_0", [])
    with pytest.raises(SystemExit, match=r"version_0: no val/acc in its event files \(was validation switched off"):
        curves.main(["--out", str(tmp_path / "x.png"), str(unvalidated)])


def test_data_efficiency_table_and_plot(tmp_path):
    made = {(5000, 0): (0.70, 0.66), (5000, 1): (0.72, 0.67), (10000, 0): (0.80, 0.79)}
    args = []
    for (size, seed), (cut, base) in made.items():
        folder = tmp_path / f"n{size}-s{seed}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps([{"method": "cutmix", "test_acc": cut},
                                                         {"method": "baseline", "test_acc": base}]))
        args.append(f"{size}={folder}")
    # a seed whose methods ran into two folders (compare.py --methods cutmix, then --methods baseline)
    for method, acc in (("cutmix", 0.68), ("baseline", 0.66)):
        (tmp_path / f"n5000-s2-{method}").mkdir()
        (tmp_path / f"n5000-s2-{method}" / "results.json").write_text(json.dumps([{"method": method, "test_acc": acc}]))
    args.append(f"5000={tmp_path / 'n5000-s2-cutmix'},{tmp_path / 'n5000-s2-baseline'}")
    with pytest.raises(SystemExit, match="n5000-s2-cutmix: no test accuracy for baseline"):
        load("data_efficiency").main([f"5000={tmp_path / 'n5000-s2-cutmix'}"])
    rows = load("data_efficiency").main([*args, "--out", str(tmp_path / "gain.png")])
    assert [r["size"] for r in rows] == [5000, 10000]
    # 5,000: gains 0.04, 0.05, 0.02 over three seeds; half ranges of the gain and of CutMix's accuracy
    assert rows[0]["gain"] == pytest.approx(0.11 / 3) and rows[0]["gain_spread"] == pytest.approx(0.015)
    assert rows[0]["cutmix"] == pytest.approx(0.70) and rows[0]["cutmix_spread"] == pytest.approx(0.02)
    assert rows[1]["gain"] == pytest.approx(0.01) and rows[1]["seeds"] == 1
    assert "| 5,000 | 3 | 70.00% ± 2.00 | 66.33% ± 0.50 | +3.67 ± 1.50 | +4.00, +5.00, +2.00 |" in load(
        "data_efficiency").table(rows)
    assert_png(tmp_path / "gain.png", (300, 200))


def test_bench_fit_times_the_logged_steps_of_one_fit(tiny_cifar, capsys):
    """--events: the rate comes from the wall times of the logged steps after the warm-up, one fit per variant."""
    repo = str(SCRIPTS.parent)
    rates = load("bench_fit").main([f"{repo}::--data.flip false", "--events", "--data-dir", str(tiny_cifar),
                                    "--reps", "1", "--batch-size", "16", "--short", "5", "--long", "30",
                                    "--data.val_size", "100", "--model.log_images", "false"])
    assert list(rates) == [f"{repo}::--data.flip false"] and rates[f"{repo}::--data.flip false"] > 0
    # logged every 10 steps; step 9 is the first after the 5 of warm-up
    assert "rep 0: " in (out := capsys.readouterr().out) and "steps 9-29 in" in out


def test_count_ops_counts_each_part_of_a_step():
    counts = load("count_ops").main(["--depth", "8", "--batch-size", "16", "--no-compile"])
    # a ResNet-8's forward and backward dispatch far more ops than the transform, and foreach SGD only a few
    assert counts["forward + backward"] > counts["transform (eager)"] > 20 > counts["optimiser step"] > 0


def test_bench_fit_events_refuses_a_fit_too_short_to_time_before_running_it(tiny_cifar, capsys):
    with pytest.raises(SystemExit):
        load("bench_fit").main([str(SCRIPTS.parent), "--events", "--data-dir", str(tiny_cifar), "--short", "5",
                                "--long", "19"])
    assert "fix: a --long of at least 20" in capsys.readouterr().err


def test_device_bundle_refuses_a_folder_without_the_cifar_archive_and_leaves_nothing(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS, repo / "scripts")
    proc = subprocess.run(["bash", str(repo / "scripts" / "device_bundle.sh"), str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and not (repo / ".device").exists()
    assert proc.stderr.strip() == (f"device_bundle.sh: no make_cifar10.py in {tmp_path / 'nowhere'}; fix: pass the "
                                   "folder of the CIFAR-10 archive")

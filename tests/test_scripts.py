"""The scripts run on tiny data and produce their files (the plot and grids open as PNG)."""

import importlib.util
import json
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


@pytest.mark.slow
def test_compare_runs_three_methods_and_writes_table_and_plot(tiny_cifar, tmp_path):
    out = tmp_path / "cmp"
    rows = load("compare").main([
        "--data-dir", str(tiny_cifar), "--out", str(out), "--epochs", "2", "--quiet",
        "--trainer.accelerator", "cpu", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--data.batch_size", "32", "--data.eval_batch_size", "100"])
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
    again = load("compare").main(["--data-dir", str(tiny_cifar), "--out", str(out), "--epochs", "2", "--quiet",
                                  "--reuse"])
    assert json.loads(marker.read_text())["resumed"] is True
    assert again[0]["fit_minutes"] == pytest.approx(rows[0]["fit_minutes"], abs=0.2)  # the pause is not counted
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in rows]


def test_visualize_grid_and_cam(tiny_cifar, in_tmp):
    viz = load("visualize")
    grid = viz.main(["grid", "--data-dir", str(tiny_cifar), "--out", str(in_tmp / "grid.png"), "--n", "8"])
    assert_png(grid, (8 * 96, 96))
    cli = cli_main(["fit", "--config", str(CONFIG_DIR / "smoke.yaml"), "--data.data_dir", str(tiny_cifar),
                    "--data.download", "false", "--data.val_size", "100", "--data.batch_size", "32",
                    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.enable_progress_bar", "false"])
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    cam = viz.main(["cam", "--data-dir", str(tiny_cifar), "--out", str(in_tmp / "cam.png"), "--n", "3",
                    "--ckpt", f"cutmix={ckpt}", "--ckpt", f"baseline={ckpt}"])
    assert_png(cam, (3 * 128, 3 * 128))


def test_bench_train_runs_and_reports_ratios(tiny_cifar, capsys):
    result = load("bench_train").main(["--data-dir", str(tiny_cifar), "--steps", "1", "--rounds", "1",
                                       "--warmup", "1", "--workers", "0", "--batch-size", "32"])
    assert result["a/b"] > 0 and result["a/c"] > 0
    out = capsys.readouterr().out
    assert "ratio a/b" in out and "ceiling" in out

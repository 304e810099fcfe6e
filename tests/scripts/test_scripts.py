"""The picture and benchmark scripts on tiny data: what they draw, count and compare (never how fast)."""

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli_runs import small
from cutmix_pl.augment import CutMix
from cutmix_pl.cli import main as cli_main
from cutmix_pl.data import CIFAR10DataModule

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_fit  # noqa: E402
import bench_train  # noqa: E402
import count_ops  # noqa: E402
import curves  # noqa: E402
import visualize  # noqa: E402


def assert_png(path, size):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size


def test_visualize_grid_and_cam(tiny_cifar, in_tmp):
    grid = visualize.main(["grid", "--data-dir", str(tiny_cifar), "--out", str(in_tmp / "grid.png"), "--n", "8"])
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size[0] >= 8 * 96
    cli = cli_main(["fit", *small(tiny_cifar), "--trainer.max_epochs", "1"])
    ckpt = str(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt")
    cam = visualize.main(["cam", "--data-dir", str(tiny_cifar), "--out", str(in_tmp / "cam.png"), "--n", "3",
                          "--ckpt", f"cutmix={ckpt}", "--ckpt", f"baseline={ckpt}"])
    # three columns (the image, then each checkpoint's map) of 4x-scaled images, three rows with captions
    assert_png(cam, (3 * (128 + 4), 14 + 3 * (128 + 14)))


def test_bench_train_feeds_every_pipeline_the_same_kind_of_batch(tiny_cifar):
    dm = CIFAR10DataModule(str(tiny_cifar), download=False, val_size=0, batch_size=32,
                           mixer=CutMix(alpha=1.0, prob=1.0))
    split = dm.split("train")
    cpu = torch.device("cpu")
    sources = {"ours": bench_train.ours(dm, split, 32, cpu), "conventional": bench_train.conventional(split, 32, 0, cpu),
               "ceiling": bench_train.ceiling(split, 32, cpu, dm)}
    for name, source in sources.items():
        images, targets = next(source)
        assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32, name
        assert targets.shape == (32, 10), name
        torch.testing.assert_close(targets.sum(1), torch.ones(32), msg=name)
        # every image is mixed (prob 1): two classes share the target, unless the partner has the same label
        assert (targets.max(1).values < 1).sum() >= 24, name
    first, again = next(sources["ceiling"]), next(sources["ceiling"])
    assert first[0] is again[0]  # the ceiling trains on one batch made once
    x1, x2 = next(sources["ours"])[0], next(sources["ours"])[0]
    assert not torch.equal(x1, x2)  # ours draws new batches


def test_bench_train_prints_the_rates_it_returns(tiny_cifar, capsys):
    result = bench_train.main(["--data-dir", str(tiny_cifar), "--steps", "1", "--rounds", "1", "--warmup", "1",
                               "--workers", "0", "--batch-size", "32", "--depth", "8"])
    out = capsys.readouterr().out
    pipelines = [k for k in result if "/" not in k]
    assert [p[0] for p in pipelines] == ["a", "b", "c"]
    for name in pipelines:  # each row: the rate and the seconds an epoch of the 640 images takes at that rate
        assert re.search(rf"{re.escape(name)}\s+{result[name]:.0f}\s+{640 / result[name]:.1f}\n", out), out


def test_bench_train_settings_compare_precisions_and_memory_formats(tiny_cifar, capsys):
    settings = ["fp32-nchw", "fp32-cl", "bf16-nchw"]
    result = bench_train.main(["--data-dir", str(tiny_cifar), "--device", "cpu", "--steps", "1", "--rounds", "2",
                               "--warmup", "1", "--batch-size", "16", "--depth", "8", "--settings", *settings])
    out = capsys.readouterr().out
    for line in ("ATen CPU capability: ", "(ATEN_CPU_CAPABILITY=", "oneDNN ISA: ", "(ONEDNN_MAX_CPU_ISA=",
                 "bf16 instructions in /proc/cpuinfo: "):
        assert line in out, out
    for name in settings:  # each row: the median rate, its ratio to fp32 NCHW, then the rate of each round
        ratio = result[name] / result["fp32-nchw"]
        assert re.search(rf"^{name}\s+{result[name]:.0f}\s+{ratio:.2f}x\s+\d+, \d+$", out, re.MULTILINE), out
    assert result["fp32-cl/fp32-nchw"] == pytest.approx(result["fp32-cl"] / result["fp32-nchw"])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available(),
                    reason="the AVX2 limits are x86's")
def test_the_avx2_limits_are_read(monkeypatch):
    """What bench_train.py's docstring says: the two variables limit PyTorch's and oneDNN's instruction sets."""
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    aten = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert aten[-1] in ("AVX2", "DEFAULT")  # DEFAULT: a CPU without AVX2
    isa = bench_train.onednn_isa()  # "unknown" where oneDNN prints no verbose line
    assert isa == "unknown" or ("AVX-512" not in isa and "AMX" not in isa), isa


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
    rows = curves.main(["--out", str(out), "--threshold", "0.7", "--threshold", "0.95", f"short={short}", str(long)])
    assert_png(out, (720, 480))
    assert [r["name"] for r in rows] == ["short", "b"]  # unnamed: the run name above version_N
    assert rows[0]["last"] == pytest.approx(0.88) and rows[0]["best"] == pytest.approx(0.9)
    assert rows[0]["reach"][0.7] == (2, pytest.approx(20.0)) and rows[0]["reach"][0.95] is None
    assert rows[1]["reach"][0.7] is None and rows[1]["seconds"] == pytest.approx(60.0)
    printed = capsys.readouterr().out
    assert "| short | 4 | 88.00% | 90.00% | 40 s | epoch 2, 20 s | not reached |" in printed


def test_curves_counts_an_epoch_a_resumed_fit_validated_again_once(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    run = _fake_fit_run(tmp_path / "r" / "version_0", [0.5, 0.6])  # killed after validating epoch 2, before saving
    with SummaryWriter(str(run), filename_suffix=".resumed") as w:  # the resume repeats epoch 2, then epoch 3
        w.add_scalar("val/acc", 0.62, 1, walltime=2000.0)
        w.add_scalar("val/acc", 0.7, 2, walltime=2010.0)
    (row,) = curves.main(["--out", str(tmp_path / "c.png"), str(run)])
    assert row["val_acc_curve"] == pytest.approx([0.5, 0.62, 0.7])


def test_curves_rejects_a_folder_without_events_and_a_threshold_out_of_range(tmp_path, capsys):
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
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow(seconds=15)
def test_bench_fit_times_the_logged_steps_of_one_fit(tiny_cifar, capsys):
    """--events: the rate is the images of the logged steps after the warm-up over the wall time between them."""
    variant = f"{SCRIPTS.parent}::--data.flip false"
    rates = bench_fit.main([variant, "--events", "--data-dir", str(tiny_cifar), "--reps", "1", "--batch-size", "16",
                            "--short", "5", "--long", "30", "--data.val_size", "100", "--model.log_images", "false",
                            "--model.net.depth", "8", "--model.net.width", "4"])
    # logged every 10 steps (global steps 9, 19, 29); 9 is the first after the 5 of warm-up
    line = re.search(r"rep 0: .*: ([\d,]+) img/s \(steps 9-29 in ([\d.]+) s\)", capsys.readouterr().out)
    assert line is not None
    rate, seconds = float(line.group(1).replace(",", "")), float(line.group(2))
    # the seconds are printed to 0.01 s and the rate to 1 img/s: the rate's own seconds lie within that rounding
    assert 20 * 16 / rate == pytest.approx(seconds, abs=0.005 + 1e-3 * seconds)
    assert list(rates) == [variant] and rates[variant] == pytest.approx(rate, abs=0.5)


def test_bench_fit_events_refuses_a_fit_too_short_to_time_before_running_it(tiny_cifar, capsys):
    with pytest.raises(SystemExit):
        bench_fit.main([str(SCRIPTS.parent), "--events", "--data-dir", str(tiny_cifar), "--short", "5", "--long", "19"])
    assert "fix: a --long of at least 20" in capsys.readouterr().err


def test_count_ops_counts_what_grows_with_the_network_and_what_does_not():
    shallow = count_ops.main(["--depth", "8", "--batch-size", "16", "--no-compile"])
    deeper = count_ops.main(["--depth", "14", "--batch-size", "16", "--no-compile"])
    # foreach SGD updates every parameter in a fixed number of ops, and the transform does not see the network;
    # the forward and backward dispatch the same ops for each of the 3 residual blocks that depth 14 adds
    assert deeper["optimiser step"] == shallow["optimiser step"] < 10
    assert deeper["transform (eager)"] == shallow["transform (eager)"]
    added = deeper["forward + backward"] - shallow["forward + backward"]
    assert added > 0 and added % 3 == 0


def test_bench_data_times_both_starts_and_leaves_the_folder_as_it_was(tmp_path, capsys):
    import bench_data
    from test_folder import leftovers, make_folder

    root = make_folder(tmp_path / "d", n=3)
    out = bench_data.main(["--root", str(root)])
    assert out["images"] == 18 and out["first_s"] > 0 and out["second_s"] > 0
    assert "first start (decode, cache write)" in capsys.readouterr().out
    assert leftovers(root) == ["cutmix_pl-cache-native.npz"]  # the cache the first start wrote, nothing else

"""CIFAR-100 and a folder dataset through the real CLI, as CIFAR-10 runs: fit, a SIGKILL and a resume that ends where
the uninterrupted run ends, test, predict with the class names, DDP on two processes, and the refusals of a resume
or an evaluation on another dataset."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runs import assert_same_metrics, assert_same_training_state, ckpt, fails, finish, small, spawn, wait_paused
from cutmix_pl.cli import CONFIG_DIR, main
from test_cifar100 import FINE, make_tiny_cifar100
from test_folder import CLASSES, make_folder

SORTED = tuple(sorted(CLASSES))


def dataset_args(dataset: str, root: Path) -> list[str]:
    """The dataset's packaged recipe, then the tiny recipe on ``root`` (its flags win)."""
    if dataset == "cifar100":
        make_tiny_cifar100(root)
        return ["--config", str(CONFIG_DIR / "cifar100.yaml"), *small(root)]
    make_folder(root, n=60, size=(12, 12))  # 180 training images of 3 classes, resized to 16x16 once
    return ["--config", str(CONFIG_DIR / "folder.yaml"), *small(root, data__image_size=16)]


def names(dataset: str) -> tuple[str, ...]:
    return tuple(FINE) if dataset == "cifar100" else SORTED


@pytest.mark.slow(seconds=90)
@pytest.mark.parametrize("dataset", ["cifar100", "folder"])
def test_fit_resumes_exactly_then_tests_and_predicts(dataset, steps_config, tmp_path):
    args = ["fit", *dataset_args(dataset, tmp_path / "data"), "--config", str(steps_config)]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir(), cut_dir.mkdir()
    ref = spawn(ref_dir, args)
    proc = spawn(cut_dir, args, pause_at=5)  # held after step 5; the newest checkpoint is step 4's, mid-epoch 0
    wait_paused(proc, cut_dir)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL
    resumed = spawn(cut_dir, [*args, "--ckpt_path", "last"], tag="resume")
    assert finish(resumed) == 0, (cut_dir / "resume.err").read_text()[-3000:]
    assert finish(ref) == 0, (ref_dir / "run.err").read_text()[-3000:]

    run = cut_dir / "runs" / "smoke" / "version_0"
    a, b = ref_dir / "runs" / "smoke" / "version_0" / "checkpoints", run / "checkpoints"
    assert_same_training_state(a / "last.ckpt", b / "last.ckpt")
    assert_same_training_state(a / "step008.ckpt", b / "step008.ckpt")
    assert_same_metrics(ref_dir / "metrics.json", cut_dir / "metrics.json")
    state = ckpt(b / "last.ckpt")
    assert state["hyper_parameters"]["num_classes"] == len(names(dataset))
    assert state["state_dict"]["net.fc.weight"].shape[0] == len(names(dataset))
    recorded = state["CIFAR10DataModule"]  # Lightning files the DataModule's state under its class name
    assert recorded["dataset"].startswith(dataset)
    metrics = json.loads((cut_dir / "metrics.json").read_text())
    assert {f"val_class/{n}" for n in names(dataset)} <= set(metrics)  # per-class accuracy under the data's names

    test = subprocess.run([sys.executable, "-m", "cutmix_pl", "test", "--ckpt_path", str(run),
                           *dataset_args_flags(args)], cwd=cut_dir, capture_output=True, text=True, timeout=600)
    assert test.returncode == 0, test.stderr[-3000:]
    assert (run / "test").is_dir()
    main(["predict", "--ckpt_path", str(run), *dataset_args_flags(args)])
    with open(run / "predict" / "predictions.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header[header.index("pred") + 1:] == [f"prob_{n}" for n in names(dataset)]
    if dataset == "folder":  # each row names its image file, whose class folder is the row's label
        assert header[:4] == ["index", "file", "label", "pred"] and len(rows) == 3 * 60
        files = [r[1] for r in rows]
        assert len(set(files)) == len(files) and all((tmp_path / "data" / f).is_file() for f in files)
        assert all(f.split("/")[:2] == ["test", SORTED[int(r[2])]] for f, r in zip(files, rows))
    else:
        assert "file" not in header


def dataset_args_flags(args: list[str]) -> list[str]:
    """The fit's flags an evaluation repeats: the data settings (where it reads the data from)."""
    out, i = [], 0
    while i < len(args):
        if args[i].startswith("--data.") and args[i] not in ("--data.train_size",):
            out += args[i:i + 2]
            i += 2
        else:
            i += 1
    return out


@pytest.mark.slow(seconds=60)
@pytest.mark.parametrize("dataset", ["cifar100", "folder"])
def test_ddp_on_two_processes(dataset, tmp_path):
    cmd = [sys.executable, "-m", "cutmix_pl", "fit", *dataset_args(dataset, tmp_path / "data"),
           "--config", str(CONFIG_DIR / "ddp.yaml"), "--trainer.devices", "2", "--trainer.max_epochs", "1",
           "--trainer.num_sanity_val_steps", "0", "--data.batch_size", "32"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = ckpt(tmp_path / "runs" / "smoke" / "version_0" / "checkpoints" / "last.ckpt")
    assert state["epoch"] == 0 and state["global_step"] == 96 // 32  # 96 images, a global batch of 32 over 2 ranks
    recorded = state["CIFAR10DataModule"]
    assert recorded["dataset"].startswith(dataset) and len(recorded["aug_rng_per_rank"]) == 2


@pytest.mark.slow(seconds=20)
def test_a_resume_or_evaluation_on_another_dataset_is_refused_in_one_line(tiny_cifar, in_tmp, capsys):
    main(["fit", *small(tiny_cifar, trainer__max_epochs=1)])
    run = in_tmp / "runs" / "smoke" / "version_0"
    other = in_tmp / "c100"
    make_tiny_cifar100(other)
    resume = fails(capsys, "fit", *small(tiny_cifar, trainer__max_epochs=2), "--ckpt_path", "last",
                   "--data.dataset", "cifar100", "--data.data_dir", str(other))
    assert "data.dataset" in resume and "cifar10" in resume and "cifar100" in resume
    evaluation = fails(capsys, "test", "--ckpt_path", str(run), "--data.dataset", "cifar100",
                       "--data.data_dir", str(other), "--data.download", "false")
    assert "cifar100" in evaluation and "cifar10" in evaluation
    assert not (run / "test").exists()  # nothing half-written


def test_the_model_summary_sizes_the_datas_images(tmp_path, monkeypatch):
    # a folder resized to 16x16: the summary's example input (its sizes and FLOPs) is one such image, not CIFAR's
    from lightning.pytorch.utilities.model_summary import ModelSummary

    args = dataset_args("folder", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    assert tuple(cli.model.example_input_array.shape) == (1, 3, 16, 16)
    assert ModelSummary(cli.model).in_sizes[0] == [1, 3, 16, 16]


@pytest.mark.slow(seconds=30)
def test_a_folder_runs_evaluations_need_only_its_checkpoint(tmp_path, monkeypatch, capsys):
    # the run's val_size (12, fitted to 180 images) is the evaluation's too: the recipe's 5000 would be out of range
    args = dataset_args("folder", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    main(["fit", *args, "--data.val_size", "12", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    run = tmp_path / "runs" / "smoke" / "version_0"
    for command in ("test", "predict"):
        main([command, "--ckpt_path", str(run), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
              "false"])
    assert (run / "test").is_dir()
    with open(run / "predict" / "predictions.csv", newline="") as f:
        assert len(list(csv.reader(f))) == 1 + 3 * 60  # a header and the 180 test images
    main(["validate", "--ckpt_path", str(run), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
          "false"])
    assert "data.val_size=12 from the checkpoint" in capsys.readouterr().err  # validate says so; the others need not

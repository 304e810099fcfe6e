"""Errors: every bad input in the catalogue (docs/troubleshooting.md) fails in one line with a fix, a non-zero exit
and no output left behind; a non-finite loss names its step and batch. (Interrupts, kills and resumes:
test_resume.py.)

Training runs here are tiny (ResNet-8 of width 4, 96 training images, batches of 16: 6 steps an epoch, 2 epochs),
so each CLI run takes seconds; the subprocess runs pay mostly for importing torch and Lightning.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from contextlib import chdir
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.trainer import trainer as trainer_module

from cutmix_pl import cifar
from cutmix_pl.cli import main
from cutmix_pl.module import ImageClassifier, SoftTargetCrossEntropy
from cutmix_pl.resnet import ResNet

from cli_runs import STEPS_PER_EPOCH, fails, files_under, small
from conftest import REPO, make_tiny_cifar

# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ckpt(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a one-epoch ResNet-8 (width 4) run."""
    cwd = tmp_path_factory.mktemp("small_ckpt")
    with chdir(cwd):
        cli = main(["fit", *small(tiny_cifar), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
        return Path(cli.trainer.log_dir).absolute() / "checkpoints" / "last.ckpt"


@pytest.fixture
def bad_data(tmp_path: Path) -> Path:
    return make_tiny_cifar(tmp_path / "bad_data", n_train=100, n_test=20)


def rewrite_batch(folder: Path, name: str, **changes: object) -> Path:
    path = folder / cifar.FOLDER / name
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry.update(changes)
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    return path


# ----------------------------------------------------------------------------------------------------------------
# the catalogue of bad inputs: one line naming the problem and the fix, exit status 2, nothing written
# ----------------------------------------------------------------------------------------------------------------
CONFIG_CASES = {
    "mixer alpha <= 0": (["--data.mixer.init_args.alpha", "0"], ["data.mixer.init_args.alpha=0.0", "> 0"]),
    "mixer prob > 1": (["--data.mixer.init_args.prob", "1.5"], ["data.mixer.init_args.prob=1.5", "[0, 1]"]),
    "depth not 6n+2": (["--model.net.depth", "21"], ["depth=21", "6n+2"]),
    "batch size 1": (["--data.batch_size", "1"], ["data.batch_size=1", ">= 2"]),
    "lr 0": (["--model.optimizer.init_args.lr", "0"], ["lr=0.0", "> 0"]),
    "lr negative": (["--model.optimizer.init_args.lr", "-1"], ["-1.0", "lr > 0"]),
    "val_size >= training set": (["--data.val_size", "640"], ["data.val_size=640", "[0, 639]"]),
    "val_size >= 50000": (["--data.val_size", "50000"], ["data.val_size=50000", "[0, 49999]"]),
    "batch larger than the training split": (["--data.batch_size", "50000"],  # refused before it fills the memory
                                             ["data.batch_size=50000", "training split (96 images)", "[2, 96]"]),
    "unknown key": (["--model.dpth", "20"], ["model.dpth", "--help"]),
    "a key cut short": (["--trainer.max_epoch", "3"], ["unrecognized arguments: --trainer.max_epoch", "--help",
                                                       "fix: did you mean --trainer.max_epochs?"]),
    "a misspelt key": (["--data.bach_size", "3"], ["--data.bach_size", "fix: did you mean --data.batch_size?"]),
    "wrong type": (["--data.batch_size", "abc"], ["data.batch_size", "abc", "--help"]),
    "wrong type where null is allowed": (["--trainer.max_epochs", "two"], ["trainer.max_epochs=two", "int", "--help"]),
    "no such mixer class": (["--data.mixer", "MixUpp"], ["data.mixer=MixUpp", "--help"]),
    "data missing offline": (["--data.data_dir", "nowhere"], ["nowhere/cifar-10-batches-py", "--data.download true",
                                                              "--data.data_dir with the folder"]),
    "checkpoint path missing": (["--ckpt_path", "nope.ckpt"], ["nope.ckpt", "does not exist", "--ckpt_path last"]),
    "checkpoint folder without a checkpoint": (["--ckpt_path", "."], ["folder without checkpoints/last.ckpt",
                                                                      "a run that saved a checkpoint"]),
    "checkpoint best": (["--ckpt_path", "best"], ["--ckpt_path best", "same Python process", "best-epochNNN.ckpt"]),
    "checkpoint hpc": (["--ckpt_path", "hpc"], ["--ckpt_path hpc", "SLURM requeue", "--ckpt_path last"]),
    "grid_size 0": (["--model.grid_size", "0"], ["model.grid_size=0", "integer >= 1", "fix:"]),
    "grid_size negative": (["--model.grid_size", "-3"], ["model.grid_size=-3", "integer >= 1", "fix:"]),
    "max_epochs -1": (["--trainer.max_epochs", "-1"], ["trainer.max_epochs=-1", "a value >= 1", "fix:"]),
    "compile mode unknown": (["--model.compile", "fast"], ["model.compile='fast'", "reduce-overhead", "fix:"]),
    "a second ModelCheckpoint like the recipe's": (
        ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.monitor", "val/acc",
         "--trainer.callbacks.mode", "max"], ["more than one stateful callback of type `ModelCheckpoint`",
                                              "state_key", "fix: check the trainer settings (fit --help"]),
}


def fit_fails_cleanly(capsys, in_tmp, expected, *args):
    """``fit`` fails in one line holding every text of ``expected`` and leaves no run folder."""
    line = fails(capsys, "fit", *args)
    for text in [*expected, "fix:"]:  # every error says how to fix it
        assert text in line, (text, line)
    assert not (in_tmp / "runs").exists(), "a failed start must leave no run folder"


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_value(case, tiny_cifar, in_tmp, capsys):
    extra, expected = CONFIG_CASES[case]
    fit_fails_cleanly(capsys, in_tmp, expected, *small(tiny_cifar), *extra)


def test_a_misspelt_key_is_named_with_the_key_it_may_mean_and_a_far_one_without(tiny_cifar, in_tmp, capsys):
    config = in_tmp / "typo.yaml"
    config.write_text("trainer:\n  max_epoch: 3\n")
    line = fails(capsys, "fit", *small(tiny_cifar), "--config", str(config))
    assert "'trainer.max_epoch'" in line and line.endswith("fix: did you mean --trainer.max_epochs? (--help lists "
                                                               "every key)"), line
    line = fails(capsys, "test", *small(tiny_cifar), "--model.tta", "true")
    assert "fix: did you mean --model.tta_flip?" in line, line
    line = fails(capsys, "fit", *small(tiny_cifar), "--nothing.like_it", "1")
    assert "did you mean" not in line and "fix: check the key and its value" in line, line


def test_a_runtime_error_lightning_did_not_raise_keeps_its_traceback(tiny_cifar, in_tmp, monkeypatch):
    """Only Lightning's own refusals of the trainer settings become one line; a driver's error is not a setting."""
    def failing_devices(*args, **kwargs):  # what the Trainer calls first to find its devices
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(trainer_module, "_AcceleratorConnector", failing_devices)
    with pytest.raises(RuntimeError, match="CUDA driver initialization failed"):
        main(["fit", *small(tiny_cifar)])


@pytest.mark.parametrize("command", ["test", "validate", "predict"])
def test_an_evaluation_of_last_without_runs_names_where_it_looked(command, tiny_cifar, in_tmp, capsys):
    line = fails(capsys, command, *small(tiny_cifar), "--ckpt_path", "last")
    assert f"found no run with a last.ckpt in {in_tmp / 'runs' / 'smoke'} (relative to the working directory" in line
    assert "runs of --config smoke are in runs/smoke" in line
    assert not (in_tmp / "runs").exists()


def test_unknown_key_in_a_config_file(tiny_cifar, in_tmp, capsys):
    (in_tmp / "typo.yaml").write_text("model:\n  dpth: 20\n")
    line = fails(capsys, "fit", *small(tiny_cifar), "--config", "typo.yaml")
    assert "model.dpth" in line and "--help" in line
    assert not (in_tmp / "runs").exists()


def test_yaml_syntax_error_names_the_file_and_line(tiny_cifar, in_tmp, capsys):
    (in_tmp / "broken.yaml").write_text("trainer:\n  max_epochs: [1,\n")
    line = fails(capsys, "fit", *small(tiny_cifar), "--config", "broken.yaml")
    assert "broken.yaml is not valid YAML (line 3, column 1:" in line and "fix:" in line
    assert not (in_tmp / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu(tiny_cifar, in_tmp, capsys):
    line = fails(capsys, "fit", *small(tiny_cifar), "--trainer.accelerator", "gpu")
    assert "gpu" in line.lower() and "--trainer.accelerator auto" in line
    assert not (in_tmp / "runs").exists()


def test_download_failure_offline(in_tmp, capsys, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(url, root, filename, md5):
        (Path(root) / filename).write_bytes(b"partial")  # as a dropped connection leaves it
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    line = fails(capsys, "fit", *small("fresh_data"), "--data.download", "true")
    assert "downloading it failed" in line and "name resolution" in line and "fix:" in line
    assert not (in_tmp / "fresh_data").exists(), "a failed download must leave no partial archive or folder"
    assert not (in_tmp / "runs").exists()


@pytest.mark.parametrize("damage,expected", [
    ("truncated", ["data_batch_3", "truncated or corrupt", "fix: delete"]),
    ("garbage", ["data_batch_3", "truncated or corrupt", "fix: delete"]),
    ("float32 data", ["data_batch_3", "dtype float32", "uint8 [N, 3072]", "fix: delete"]),
    ("wrong shape", ["data_batch_3", "shape [20, 1024]", "uint8 [N, 3072]", "fix: delete"]),
    ("bad labels", ["data_batch_3", "labels outside [0, 9]", "fix: delete"]),
])
def test_damaged_batch_file(damage, expected, bad_data, in_tmp, capsys):
    path = bad_data / cifar.FOLDER / "data_batch_3"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"<html>404 not found</html>")
    elif damage == "float32 data":
        rewrite_batch(bad_data, "data_batch_3", data=np.zeros((20, 3072), np.float32))
    elif damage == "wrong shape":
        rewrite_batch(bad_data, "data_batch_3", data=np.zeros((20, 1024), np.uint8))
    else:
        rewrite_batch(bad_data, "data_batch_3", labels=[10] * 20)
    fit_fails_cleanly(capsys, in_tmp, expected, *small(bad_data), "--data.train_size", "null", "--data.val_size", "10")


def test_log_folder_under_a_file(tiny_cifar, in_tmp, capsys):
    (in_tmp / "notes.txt").write_text("a file where a folder should be")
    line = fails(capsys, "fit", *small(tiny_cifar), "--trainer.logger.init_args.save_dir", "notes.txt/runs")
    assert "notes.txt is a file" in line and "--trainer.logger.init_args.save_dir" in line
    assert (in_tmp / "notes.txt").is_file() and sorted(p.name for p in in_tmp.iterdir()) == ["notes.txt"]


def test_log_folder_read_only(tiny_cifar, in_tmp, capsys, monkeypatch):
    locked = in_tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway, so make os.access say what it says to other users
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p).absolute() == locked.absolute()
                            else real(p, mode, *a, **k))
    try:
        line = fails(capsys, "fit", *small(tiny_cifar), "--trainer.logger.init_args.save_dir", "locked/runs")
    finally:
        locked.chmod(0o755)
    assert "is not writable" in line and "--trainer.logger.init_args.save_dir" in line


def test_a_read_only_run_is_not_resumed_and_the_fix_does_not_point_elsewhere(tiny_cifar, in_tmp, capsys,
                                                                          monkeypatch):
    run = Path(main(["fit", *small(tiny_cifar, trainer__max_epochs=1)]).trainer.log_dir).absolute()
    before = files_under(run)
    run.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway, so make os.access say what it says to other users
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p).absolute() == run
                            else real(p, mode, *a, **k))
    try:
        line = fails(capsys, "fit", *small(tiny_cifar), "--trainer.max_epochs", "2", "--ckpt_path", str(run))
    finally:
        run.chmod(0o755)
    assert f"cannot write the run folder {run}: {run} is not writable" in line, line
    assert "copy the run folder to a writable place and pass the copy to --ckpt_path" in line
    assert "save_dir" not in line, "a resume continues in its own folder: another save_dir cannot help"
    assert files_under(run) == before


def test_checkpoint_of_another_depth(small_ckpt, tiny_cifar, in_tmp, capsys):
    line = fails(capsys, "fit", *small(tiny_cifar), "--model.net.depth", "14", "--ckpt_path", str(small_ckpt))
    assert "depth=8" in line and "depth=14" in line and "--model.net.depth 8" in line
    assert not (in_tmp / "runs").exists(), "a checkpoint mismatch must leave no run folder"
    line = fails(capsys, "validate", *small(tiny_cifar), "--model.net.depth", "14", "--model.net.width", "8",
                 "--ckpt_path", str(small_ckpt))
    assert "depth=8, width=4 but the config asks for depth=14, width=8" in line  # every difference, at once
    assert "--model.net.depth 8 --model.net.width 4" in line


def test_checkpoint_of_another_class_count(small_ckpt, tiny_cifar, in_tmp, capsys):
    checkpoint = torch.load(small_ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["num_classes"] = 100
    torch.save(checkpoint, in_tmp / "cifar100.ckpt")
    line = fails(capsys, "fit", *small(tiny_cifar), "--ckpt_path", "cifar100.ckpt")
    assert "num_classes=100" in line and "num_classes=10" in line and "fix:" in line
    assert not (in_tmp / "runs").exists()


def test_checkpoint_without_hparams_of_another_width(small_ckpt, tiny_cifar, in_tmp, capsys):
    checkpoint = torch.load(small_ckpt, map_location="cpu", weights_only=True)
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, in_tmp / "bare.ckpt")
    line = fails(capsys, "fit", *small(tiny_cifar), "--model.net.width", "8", "--ckpt_path", "bare.ckpt")
    assert "does not fit this model" in line and "shape" in line and "--model.net" in line


def test_checkpoint_whose_settings_do_not_describe_its_weights(small_ckpt, tiny_cifar, in_tmp, capsys):
    checkpoint = torch.load(small_ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["net"]["init_args"]["depth"] = 14  # the weights stay depth 8
    torch.save(checkpoint, in_tmp / "edited.ckpt")
    args = small(tiny_cifar)
    del args[args.index("--model.net.depth"):args.index("--model.net.depth") + 2]  # taken from the checkpoint
    line = fails(capsys, "test", *args, "--ckpt_path", "edited.ckpt")
    assert "edited.ckpt does not fit this model: its weights" in line
    assert "lack 36 of this model's tensors" in line and "fix: pass a .ckpt file whose settings and weights" in line
    assert not (in_tmp / "test").exists()
    model = ImageClassifier(net=ResNet(8, width=4))
    checkpoint["state_dict"]["net.extra.weight"] = torch.zeros(1)  # and a tensor this network does not have
    with pytest.raises(ValueError, match=r"its weights lack 36 .* and hold 1 it does not have \(e.g. net.extra"):
        ImageClassifier(net=ResNet(14, width=4)).check_compatible({**checkpoint, "hyper_parameters": {}})
    with pytest.raises(ValueError, match=r"its weights hold 1 it does not have"):
        model.check_compatible({**checkpoint, "hyper_parameters": {}})


def test_mismatch_is_caught_in_the_module_too(small_ckpt):
    """Lightning's own loading (load_from_checkpoint, trainer.fit(ckpt_path=...)) goes through on_load_checkpoint."""
    checkpoint = torch.load(small_ckpt, map_location="cpu", weights_only=True)
    with pytest.raises(ValueError, match=r"depth=8 .* depth=14; fix: pass --model.net.depth 8"):
        ImageClassifier(net=ResNet(14, width=4)).on_load_checkpoint(checkpoint)
    ImageClassifier(net=ResNet(8, width=4)).on_load_checkpoint(checkpoint)  # the matching model loads


def test_corrupt_checkpoint(small_ckpt, tiny_cifar, in_tmp, capsys):
    (in_tmp / "cut.ckpt").write_bytes(small_ckpt.read_bytes()[:5000])
    line = fails(capsys, "fit", *small(tiny_cifar), "--ckpt_path", "cut.ckpt")
    assert "cut.ckpt is not a readable checkpoint" in line and "fix:" in line
    assert not (in_tmp / "runs").exists()


@pytest.mark.parametrize("sub", ["fit", "test"])
@pytest.mark.parametrize("content", ["tensor", "dict", "weights", "weights and hparams"])
def test_a_file_that_is_not_a_lightning_checkpoint_is_one_line(sub, content, small_ckpt, tiny_cifar, in_tmp, capsys):
    full = torch.load(small_ckpt, weights_only=True)
    torch.save({"tensor": torch.zeros(3), "dict": {"a": 1}, "weights": full["state_dict"],
                "weights and hparams": {k: full[k] for k in ("state_dict", "hyper_parameters")}}[content], "x.pt")
    line = fails(capsys, sub, *small(tiny_cifar), "--ckpt_path", "x.pt")
    assert "x.pt is not a Lightning checkpoint" in line and "fix: pass a .ckpt file" in line
    assert not (in_tmp / "runs").exists()


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_evaluation_without_a_checkpoint(sub, tiny_cifar, in_tmp, capsys):
    line = fails(capsys, sub, *small(tiny_cifar))
    assert f"{sub} needs --ckpt_path" in line and "an untrained network" in line and "fix:" in line
    assert not (in_tmp / "runs").exists(), "nothing written"


@pytest.mark.parametrize("args,expected,most", [
    (["fit", "--model.dpth", "20"], "model.dpth", 1),
    (["fit", "--data.batch_size", "1"], "data.batch_size=1", 1),  # refused before the command starts: one line
    (["fit", "--data.data_dir", "{data}", "--data.download", "false", "--trainer.accelerator", "cpu"],
     "truncated or corrupt", 6),
])
def test_cli_errors_are_short_in_a_subprocess(args, expected, most, bad_data, tmp_path):
    batch = bad_data / cifar.FOLDER / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:100])
    args = [a.replace("{data}", str(bad_data)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "cutmix_pl", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    # once the command has started, the lines about its settings and Lightning's (seed, devices) may come first
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr and len(lines) <= most, proc.stderr[-2000:]
    assert sum("error" in ln for ln in lines) == 1
    assert lines[-1].startswith("cutmix-pl: error:") and expected in lines[-1]
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------
# a non-finite loss
# ----------------------------------------------------------------------------------------------------------------
def test_non_finite_loss_names_step_and_batch(tiny_cifar, in_tmp, capsys, monkeypatch):
    forward = SoftTargetCrossEntropy.forward
    calls = {"train": 0}

    def poisoned(self, logits, targets):
        loss = forward(self, logits, targets)
        if logits.requires_grad:  # training steps only
            calls["train"] += 1
            if calls["train"] == STEPS_PER_EPOCH + 3:  # epoch 1, batch 2, global step 8
                return loss * float("nan")
        return loss

    monkeypatch.setattr(SoftTargetCrossEntropy, "forward", poisoned)
    line = fails(capsys, "fit", *small(tiny_cifar))
    assert "non-finite at global step 8 (epoch 1, batch 2)" in line and "fix: lower model.optimizer's lr" in line
    run = in_tmp / "runs" / "smoke" / "version_0"
    assert (run / "config.yaml").is_file(), "the logs of a run that trained are kept"

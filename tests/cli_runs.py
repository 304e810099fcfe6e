"""Helpers for CLI runs in tests: the tiny recipe, subprocess runs that pause at a step (so a signal lands at a
known point) and comparisons of two runs' checkpoints and metrics."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cutmix_pl.cli import CONFIG_DIR, main

STEPS_PER_EPOCH = 6


def small(data_dir: Path | str, **settings: object) -> list[str]:
    """The tiny recipe's flags: smoke.yaml on ``data_dir``, 2 epochs of 96 training images in batches of 16
    (STEPS_PER_EPOCH steps), 50 validation images, a depth-8, width-4 ResNet.

    ``settings`` replace a flag's value or add a flag, ``section__key=value`` for ``--section.key value``
    (``data__batch_size=64``, ``model__net__depth=20``); None is YAML's null, booleans are true/false.
    The first two items stay ``--config smoke.yaml``.
    """
    flags = {"trainer.accelerator": "cpu", "trainer.max_epochs": 2, "trainer.limit_train_batches": None,
             "trainer.limit_val_batches": 2, "trainer.log_every_n_steps": 1, "trainer.enable_progress_bar": False,
             "trainer.enable_model_summary": False, "data.batch_size": 16, "data.eval_batch_size": 50,
             "data.val_size": 50, "data.train_size": 96, "data.download": False, "model.net.depth": 8,
             "model.net.width": 4, "model.log_images": False}
    flags.update({key.replace("__", "."): value for key, value in settings.items()})
    args = ["--config", str(CONFIG_DIR / "smoke.yaml"), "--data.data_dir", str(data_dir)]
    for key, value in flags.items():
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        args += [f"--{key}", text]
    return args


def kept_checkpoints(dirpath: Path | str) -> list[str]:
    """Flags adding a second ModelCheckpoint that keeps every epoch's checkpoint in ``dirpath`` (told apart from the
    recipe's by its monitor)."""
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath",
            str(dirpath), "--trainer.callbacks.monitor", "val/loss", "--trainer.callbacks.save_top_k", "-1"]


# A checkpoint every 4 steps (steps 4 and 8 fall mid-epoch), on top of the default callbacks.
STEP_CHECKPOINTS = """\
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        monitor: null
        mode: min
        every_n_train_steps: 4
        save_top_k: -1
        save_last: true
        filename: step{step:03d}
        auto_insert_metric_name: false
"""

# `python -m cutmix_pl` plus test hooks: PAUSE_AT_STEP holds training after that global step, PAUSE_IN_LAST_VAL holds
# the last epoch's validation, PAUSE_IN_SETUP the DataModule's setup, before training, PAUSE_IN_READ the reading of a
# batch file, inside the CIFAR reader's error handling (each until a signal arrives, so that it lands at a known
# point), KILL_IN_SAVE=N kills the process with SIGKILL half-way through writing its N-th file whose name holds
# KILL_IN_WRITE_OF (default "ckpt"); the final metrics go to metrics.json.
WRAPPER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from cutmix_pl.runs.stop import StopOnSignal
    from cutmix_pl.cli import main
    from cutmix_pl.module import ImageClassifier

    pause_at = int(os.environ.get("PAUSE_AT_STEP", "-1"))

    def hold(trainer, what):
        Path("paused").write_text(what)
        stop = next(c for c in trainer.callbacks if isinstance(c, StopOnSignal))
        deadline = time.monotonic() + 300
        while stop.signum is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == pause_at:
            hold(self.trainer, str(self.global_step))

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        last = self.current_epoch == self.trainer.max_epochs - 1
        if os.environ.get("PAUSE_IN_LAST_VAL") and last and not self.trainer.sanity_checking and batch_idx == 0:
            hold(self.trainer, "validation")

    train_epoch_end = ImageClassifier.on_train_epoch_end

    def on_train_epoch_end(self):  # the means are logged, not yet written (Lightning writes them after this hook)
        train_epoch_end(self)
        if self.current_epoch == int(os.environ.get("PAUSE_AT_EPOCH_END", "-1")):
            hold(self.trainer, "epoch end")

    if os.environ.get("PAUSE_IN_SETUP"):
        from cutmix_pl.data import CIFAR10DataModule

        def setup(self, stage=None):
            Path("paused").write_text("setup")
            time.sleep(300)  # a signal ends it (the CLI's handler raises outside training)

        CIFAR10DataModule.setup = setup
    if os.environ.get("PAUSE_IN_READ"):
        from cutmix_pl import pickles

        def load(self):
            Path("paused").write_text("read")
            time.sleep(300)  # a signal ends it, inside the reader's try

        pickles.SafeUnpickler.load = load
    if int(os.environ.get("KILL_IN_SAVE", "0")):
        sys.path.insert(0, os.environ["TESTS_DIR"])
        import kill_on_write
        kill_on_write.install(int(os.environ["KILL_IN_SAVE"]), Path("killed_in_save"),
                              os.environ.get("KILL_IN_WRITE_OF", "ckpt"))
    ImageClassifier.on_train_batch_end = on_train_batch_end
    ImageClassifier.on_train_epoch_end = on_train_epoch_end
    ImageClassifier.on_validation_batch_end = on_validation_batch_end
    cli = main(sys.argv[1:])
    if cli is not None and cli.trainer.state.finished:
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
        Path("metrics.json").write_text(json.dumps(metrics))
""")


def last_err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    return err[-1]


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the CLI in-process, expect exit status 2 and a one-line error; return that line."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    line = last_err_line(capsys)
    assert line.startswith("cutmix-pl: error:"), line
    return line


def files_under(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def spawn(cwd: Path, args: list[str], pause_at: int | None = None, tag: str = "run", **hooks: str) -> subprocess.Popen:
    """``python -m cutmix_pl ARGS`` in ``cwd`` (output in TAG.out/TAG.err), with the WRAPPER's hooks set."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("CUTMIX_PL_TRACEBACK", "CUTMIX_PL_RUN", "PAUSE_AT_STEP", "PAUSE_IN_LAST_VAL", "PAUSE_IN_SETUP",
                "PAUSE_IN_READ", "PAUSE_AT_EPOCH_END", "KILL_IN_SAVE", "KILL_IN_WRITE_OF"):
        env.pop(key, None)
    if pause_at is not None:
        env["PAUSE_AT_STEP"] = str(pause_at)
    env.update(hooks, TESTS_DIR=str(Path(__file__).resolve().parent))
    (cwd / "paused").unlink(missing_ok=True)
    out, err = open(cwd / f"{tag}.out", "w"), open(cwd / f"{tag}.err", "w")
    with out, err:
        return subprocess.Popen([sys.executable, "-c", WRAPPER, *args], cwd=cwd, env=env, stdout=out, stderr=err)


def wait_paused(proc: subprocess.Popen, cwd: Path, limit: float = 480, tag: str = "run") -> None:
    """Wait until the run holds at its pause (a hang guard only: the pause itself is deterministic)."""
    deadline = time.monotonic() + limit
    while not (cwd / "paused").exists():
        assert proc.poll() is None, f"the run ended early (rc {proc.returncode}):\n{(cwd / f'{tag}.err').read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the run never reached its pause step"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, limit: float = 480) -> int:
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: Path, b: Path, tol: float = 1e-6) -> None:
    ca, cb = ckpt(a), ckpt(b)
    assert ca["global_step"] == cb["global_step"] and ca["epoch"] == cb["epoch"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for k, v in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][k], v, atol=tol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    for i in sa:
        torch.testing.assert_close(sb[i]["momentum_buffer"], sa[i]["momentum_buffer"], atol=tol, rtol=0)
    assert ca["lr_schedulers"][0]["last_epoch"] == cb["lr_schedulers"][0]["last_epoch"]


def assert_same_metrics(a: Path, b: Path, tol: float = 1e-5) -> None:
    ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
    # the training means too: an epoch resumed part-way must still average all of its batches
    for key in ("val/acc", "val/loss", "val/acc_top5", "hp_metric", "train/loss_epoch", "train/acc_dominant"):
        assert mb[key] == pytest.approx(ma[key], abs=tol), key



"""Callbacks the CLI adds to every run: ``last.ckpt`` after every validation, a clean stop on a signal, and the
predictions file of ``predict``.

The CLI adds :class:`StopOnSignal` to every run (through ``trainer_defaults``, so a config that replaces
``trainer.callbacks`` cannot drop it). On the first SIGTERM, SIGHUP (a closed terminal or ssh session) or SIGINT
the current training batch runs to its end,
then the full training state (weights, optimiser, scheduler, loop position, the DataModule's epoch position and
augmentation stream, the global RNGs) is written to ``last.ckpt`` (:class:`LastCheckpoint`'s file),
and :class:`Interrupted` ends the fit; ``cutmix_pl.cli.main`` turns it into one line and exit status 128 + the
signal number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP). ``fit --ckpt_path last`` continues from that
checkpoint. A signal during a validation lets it finish (its epoch-end checkpoint included), then stops the same way,
also after the last epoch's. A second Ctrl-C stops at once, without saving, in the same one line.

:class:`PredictionWriter` writes what ``predict`` computes to ``predictions.csv`` in the run's log folder;
:class:`SaveConfigNoOverwrite` keeps a run's first ``config.yaml`` and writes a resume's beside it
(``config.resumeN.yaml``); :class:`ResumedEpochBar` starts a resumed epoch's progress bar where it stands.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checkpoint_io import atomic_write

__all__ = ["Interrupted", "LastCheckpoint", "PredictionWriter", "ResumedEpochBar", "SaveConfigNoOverwrite", "StopOnSignal",
           "StoppedEarly", "last_checkpoint_path", "stop_early_on_signals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class Interrupted(BaseException):
    """A fit stopped by a signal after saving a checkpoint (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int, checkpoint: str | None, step: int, epoch: int, batch: int) -> None:
        self.signum, self.checkpoint, self.step, self.epoch, self.batch = signum, checkpoint, step, epoch, batch
        name = signal.Signals(signum).name
        saved = f"saved {checkpoint}" if checkpoint else "nothing saved (stopped at once by a second signal)"
        super().__init__(f"stopped by {name} after global step {step} (epoch {epoch}, batch {batch}); {saved}; "
                         "resume: run the same command with --ckpt_path last")


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<run>/checkpoints/last.ckpt`` at every point where Lightning checkpoints an epoch (after each
    validation, or each epoch when there is none), so that it is the newest state, whatever other checkpoints a
    config keeps. A config's checkpoint every N steps keeps it current between those points with its own
    ``save_last: true`` (it writes the same file).

    ``ModelCheckpoint(save_last=True)`` does not promise that: since Lightning 2.6 it writes ``last.ckpt`` only at a
    step where it also wrote a top-k checkpoint, so with ``monitor: val/acc, save_top_k: 1`` its ``last.ckpt`` is the
    best epoch's state, not the last one's. Here the one kept "top-k" file is itself named ``last``: one file,
    rewritten (atomically, checkpoint_io.py) at every save.
    """

    def __init__(self) -> None:
        super().__init__(filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1, save_last=False,
                         enable_version_counter=False)


class SaveConfigNoOverwrite(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder; a resumed run adds ``config.resume1.yaml``, ... next to it."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and not self.overwrite and trainer.log_dir:
            stem, ext = os.path.splitext(self.config_filename)
            name, k = self.config_filename, 0
            log_dir = trainer.log_dir  # a broadcast under DDP: every rank must make it, so not in rank 0's loop
            while trainer.is_global_zero and os.path.lexists(os.path.join(log_dir, name)):
                k += 1
                name = f"{stem}.resume{k}{ext}"
            self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)


class ResumedEpochBar(Callback):
    """A fit resumed mid-epoch skips Lightning's epoch-start hooks, so the progress bar would show ``Training: N/?``:
    at the first batch, give it what an epoch start gives it (``Epoch E`` and the epoch's length)."""

    def __init__(self) -> None:
        self._mid_epoch = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mid_epoch = trainer.fit_loop.epoch_loop.batch_progress.current.ready > 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        bar, self._mid_epoch = trainer.progress_bar_callback if self._mid_epoch else None, False
        if bar is not None:
            bar.on_train_epoch_start(trainer, pl_module)


class StoppedEarly(Exception):
    """A signal outside training (while the command starts, sets up, or evaluates): there is no training state to
    save, so the command stops, and what it wrote is removed as after any failure (an Exception, so it is)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} outside training (while starting, evaluating or "
                         "finishing): no training state to save; a fit that had saved a checkpoint resumes with "
                         "--ckpt_path last, else run the command again")


@contextlib.contextmanager
def stop_early_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`StoppedEarly` while the block runs (StopOnSignal takes over during
    training), instead of killing the process where it stands or printing a KeyboardInterrupt traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise StoppedEarly(signum)

    previous = {sig: signal.signal(sig, stop) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` lives for this run: :class:`LastCheckpoint`'s folder, else ``log_dir/checkpoints``."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, LastCheckpoint) and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    root = trainer.log_dir or trainer.default_root_dir
    return Path(root) / "checkpoints" / "last.ckpt"


class StopOnSignal(Checkpoint):
    """On SIGTERM, SIGHUP or SIGINT during fit: end the current batch, save ``last.ckpt``, raise :class:`Interrupted`.

    A ``Checkpoint`` callback, so Lightning runs it after the other checkpoint callbacks (and in the group that runs
    after the module's ``on_train_epoch_end``): at an epoch's end, ModelCheckpoint saves and records its best model
    before this stops the fit.

    Args:
        check_every: under DDP, ranks agree on stopping every ``check_every`` steps (a collective); a single
            process checks after every batch, at no cost.
    """

    def __init__(self, check_every: int = 10) -> None:
        self.check_every = max(1, int(check_every))
        self.signum: int | None = None
        self._pending: Interrupted | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    # -- handlers --------------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT and self._trainer is not None:
            # a second Ctrl-C: stop now, without a checkpoint (not a KeyboardInterrupt, which Lightning turns into
            # its own line and exit status 1)
            t = self._trainer
            raise Interrupted(signum, None, t.global_step, t.current_epoch, t.fit_loop.epoch_loop.batch_idx)
        self.signum = signum

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for sig in _SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # -- hooks -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum, self._pending, self._trainer = None, None, trainer
        self._install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's last batch: its validation and epoch-end checkpoint come first (on_train_epoch_end)
        if trainer.world_size > 1 and (trainer.global_step % self.check_every) != 0:
            return
        if self._agreed(trainer):
            # The same point as ModelCheckpoint(every_n_train_steps=...) saves at, so the resume is exact. The stop
            # itself waits for the next batch's start, so that Lightning first logs this step's metrics (a resume
            # starts after this step and would never log them).
            self._pending = self._save(trainer, batch_idx, trainer.current_epoch)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            raise pending

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the epoch's validation, where ModelCheckpoint(save_on_train_epoch_end=True) saves: a checkpoint taken
        # at the last batch, before that validation, resumes without it (Lightning counts the epoch as done). The
        # stop waits for the next epoch's start: Lightning writes the epoch's logged means after this hook.
        if self._agreed(trainer):
            self._pending = self._save(trainer, max(0, trainer.num_training_batches - 1), trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            raise pending

    def _agreed(self, trainer: L.Trainer) -> bool:
        """Whether to stop now: this process's flag, or under DDP any rank's (a collective: all ranks call it)."""
        stop = self.signum is not None
        return trainer.strategy.reduce_boolean_decision(stop, all=False) if trainer.world_size > 1 else stop

    def _save(self, trainer: L.Trainer, batch_idx: int, epoch: int) -> Interrupted:
        """Save last.ckpt; return the exception that ends the fit."""
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        signum = self.signum if self.signum is not None else signal.SIGTERM
        return Interrupted(signum, str(path), trainer.global_step, epoch, batch_idx)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._uninstall()
        if trainer.progress_bar_callback is not None and trainer.progress_bar_callback.is_enabled:
            print(flush=True)  # end the progress bar's line (stdout), so that the stop line starts a line of its own
        # Lightning's own SIGTERM handler (active before training starts) ends the loop at a batch boundary too.
        if isinstance(exception, SIGTERMException) and trainer.training and not trainer.sanity_checking:
            trainer.save_checkpoint(last_checkpoint_path(trainer), weights_only=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._uninstall()
        self._pending = None  # a stop asked at the last epoch's end: the finished fit is saved below
        # agreed over ranks: saving is collective (the DataModule gathers every rank's stream), so a signal that
        # reached some ranks only must not send those alone into it
        if self._agreed(trainer):
            # The signal came during the last validation, after the last training batch: the fit is complete and
            # LastCheckpoint has saved it; saved again here all the same (a fit outside the CLI may lack it), and the
            # run was asked to stop.
            last_epoch = max(0, trainer.current_epoch - 1)  # the loop has counted past the epoch it finished
            raise self._save(trainer, max(0, trainer.num_training_batches - 1), last_epoch)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._uninstall()


class PredictionWriter(Callback):
    """Writes ``predict``'s output to ``<log_dir>/predictions.csv`` and prints the path.

    One row per image: ``index`` (its position in the predicted split), ``label`` (the true class, empty when
    unknown), ``pred`` (the predicted class) and one probability column per class. Under DDP every rank writes its
    shard to a part file; rank 0 joins them in index order.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        self.filename = filename
        self._rows: list[dict[str, torch.Tensor]] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(outputs, dict) and "prob" in outputs:
            self._rows.append({k: v.detach().cpu() for k, v in outputs.items() if isinstance(v, torch.Tensor)})

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self._folder(trainer)
        target = folder / self.filename
        if trainer.world_size == 1:
            self._write(target, self._rows, getattr(trainer.datamodule, "classes", None))
        else:
            part = folder / f".{self.filename}.part{trainer.global_rank}"
            self._write(part, self._rows, getattr(trainer.datamodule, "classes", None))
            trainer.strategy.barrier("predictions")
            if trainer.is_global_zero:
                self._join([folder / f".{self.filename}.part{r}" for r in range(trainer.world_size)], target)
            trainer.strategy.barrier("predictions-joined")
        self._rows = []
        if trainer.is_global_zero:
            print(f"cutmix-pl: wrote the predictions to {target}", file=sys.stderr)

    @staticmethod
    def _write(path: Path, rows: list[dict[str, torch.Tensor]], classes: Any) -> None:
        k = rows[0]["prob"].shape[1] if rows else 0
        names = list(classes) if classes is not None and len(classes) == k else [str(i) for i in range(k)]
        text = io.StringIO(newline="")
        out = csv.writer(text)
        out.writerow(["index", "label", "pred", *(f"prob_{n}" for n in names)])
        for part in rows:
            n = len(part["prob"])
            index = part.get("index", torch.full((n,), -1)).tolist()
            label = part["label"].tolist() if "label" in part else [""] * n
            for i, y, p, probs in zip(index, label, part["pred"].tolist(), part["prob"].tolist()):
                out.writerow([i, y, p, *(f"{q:.6g}" for q in probs)])
        atomic_write(path, text.getvalue().encode(), "the predictions")

    @staticmethod
    def _join(parts: list[Path], target: Path) -> None:
        header, rows = None, []
        for part in parts:
            with open(part, newline="") as f:
                reader = csv.reader(f)
                header = next(reader)
                rows.extend(reader)
            part.unlink()
        rows.sort(key=lambda r: int(r[0]))
        text = io.StringIO(newline="")
        out = csv.writer(text)
        out.writerow(header or [])
        out.writerows(rows)
        atomic_write(target, text.getvalue().encode(), "the predictions")

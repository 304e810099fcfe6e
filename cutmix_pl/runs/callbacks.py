"""Callbacks the CLI adds to every run: ``last.ckpt`` always the newest state, the run's config files, and a resumed
epoch's progress bar."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn

from ..files import atomic_write

__all__ = ["LastCheckpoint", "ResumedEpochBar", "SaveConfigNoOverwrite", "last_checkpoint_path"]


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<run>/checkpoints/last.ckpt`` at every epoch's end (after the epoch's validation, if it has one),
    so that it is the newest state, whatever other checkpoints a config keeps and whatever the validation schedule.
    A config's checkpoint every N steps keeps it current between those points with its own ``save_last: true`` (it
    writes the same file).

    ``ModelCheckpoint(save_last=True)`` does not promise that: since Lightning 2.6 it writes ``last.ckpt`` only at a
    step where it also wrote a top-k checkpoint, so with ``monitor: val/acc, save_top_k: 1`` its ``last.ckpt`` is the
    best epoch's state, not the last one's. Here the one kept "top-k" file is itself named ``last``: one file,
    rewritten (atomically, folder.AtomicCheckpointIO) at every save.

    It runs before the config's checkpoints (the CLI puts it first), so that the resume point is on disk before any
    best copy: with room for one file, the run keeps the state it can resume from. The records of the checkpoints
    that save after it (their best model) are then one save behind in it: :attr:`follow_up`, placed after them,
    writes it again when one of them changed its record.
    """

    def __init__(self) -> None:
        # at every epoch's end, after its validation: left to Lightning, check_val_every_n_epoch > 1 or a
        # val_check_interval would save only after validations, and the last epochs would never reach last.ckpt
        super().__init__(filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1, save_last=False,
                         enable_version_counter=False, save_on_train_epoch_end=True)
        self.follow_up = _LastFollowUp(self)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.follow_up.mark(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.follow_up.mark(trainer)


class _LastFollowUp(Checkpoint):
    """Writes last.ckpt again, at the hook where :class:`LastCheckpoint` wrote it, once the checkpoints after it have
    saved, if they changed their records meanwhile (a new best model), so that a resume restores them as they are.
    A ``Checkpoint``, so that Lightning runs it after the config's ModelCheckpoints; stateless."""

    def __init__(self, last: LastCheckpoint) -> None:
        self.last, self.seen = last, None

    def _records(self, trainer: L.Trainer) -> str:
        return repr([cb.state_dict() for cb in trainer.checkpoint_callbacks
                     if isinstance(cb, ModelCheckpoint) and cb is not self.last])

    def mark(self, trainer: L.Trainer) -> None:
        self.seen = self._records(trainer)

    def _follow(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seen, self.seen = self.seen, None
        if (seen is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
                and self._records(trainer) != seen):
            trainer.save_checkpoint(last_checkpoint_path(trainer), weights_only=False)

    on_train_epoch_end = on_validation_end = _follow


class SaveConfigNoOverwrite(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder; a resumed run adds ``config.resume1.yaml``, ... next to it. Written
    atomically: a kill mid-write leaves the run's earlier config files as they were, never an empty newest one."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir or self.multifile or not trainer.log_dir:
            return super().setup(trainer, pl_module, stage)
        stem, ext = os.path.splitext(self.config_filename)
        name, k = self.config_filename, 0
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must make it, so not in rank 0's loop
        while trainer.is_global_zero and not self.overwrite and os.path.lexists(os.path.join(log_dir, name)):
            k += 1
            name = f"{stem}.resume{k}{ext}"
        self.config_filename = trainer.strategy.broadcast(name)
        if trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            atomic_write(Path(log_dir) / self.config_filename, text.encode(), "the run's config")
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)


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


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` lives for this run: :class:`LastCheckpoint`'s folder, else ``log_dir/checkpoints``."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, LastCheckpoint) and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    root = trainer.log_dir or trainer.default_root_dir
    return Path(root) / "checkpoints" / "last.ckpt"

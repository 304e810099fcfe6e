"""Callbacks the CLI adds to every run: ``last.ckpt`` after every validation, a run's config files, a resumed epoch's
progress bar, and the predictions file of ``predict``. The stop on a signal: ``signals.py``.

:class:`LastCheckpoint` keeps ``<run>/checkpoints/last.ckpt`` the newest state; :class:`SaveConfigNoOverwrite` keeps
a run's first ``config.yaml`` and writes a resume's beside it (``config.resumeN.yaml``); :class:`ResumedEpochBar`
starts a resumed epoch's progress bar where it stands; :class:`PredictionWriter` writes what ``predict`` computes to
``predictions.csv`` in the run's log folder.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn

from .checkpoint_io import atomic_write

__all__ = ["LastCheckpoint", "PredictionWriter", "ResumedEpochBar", "SaveConfigNoOverwrite", "last_checkpoint_path"]


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<run>/checkpoints/last.ckpt`` at every point where Lightning checkpoints an epoch (after each
    validation, or each epoch when there is none), so that it is the newest state, whatever other checkpoints a
    config keeps. A config's checkpoint every N steps keeps it current between those points with its own
    ``save_last: true`` (it writes the same file).

    ``ModelCheckpoint(save_last=True)`` does not promise that: since Lightning 2.6 it writes ``last.ckpt`` only at a
    step where it also wrote a top-k checkpoint, so with ``monitor: val/acc, save_top_k: 1`` its ``last.ckpt`` is the
    best epoch's state, not the last one's. Here the one kept "top-k" file is itself named ``last``: one file,
    rewritten (atomically, checkpoint_io.py) at every save.


    It runs before the config's checkpoints (the CLI puts it first), so that the resume point is on disk before any
    best copy: with room for one file, the run keeps the state it can resume from. The records of the checkpoints
    that save after it (their best model) are then one save behind in it: :attr:`follow_up`, placed after them,
    writes it again when one of them changed its record.
    """

    def __init__(self) -> None:
        super().__init__(filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1, save_last=False,
                         enable_version_counter=False)
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


class PredictionWriter(Callback):
    """Writes ``predict``'s output to ``<log_dir>/predictions.csv`` and prints the path.

    One row per image: ``index`` (its position in the predicted split), ``label`` (the true class, empty when
    unknown), ``pred`` (the predicted class) and one probability column per class. Under DDP every rank writes its
    shard to a part file; rank 0 joins them in index order.

    Args:
        filename: the file's name inside the log folder.
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

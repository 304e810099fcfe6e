"""Stopping a fit cleanly on SIGTERM or Ctrl-C (SIGINT): finish the batch, save ``last.ckpt``, exit.

The CLI adds :class:`StopOnSignal` to every run (through ``trainer_defaults``, so a config that replaces
``trainer.callbacks`` cannot drop it). On the first SIGTERM or SIGINT the current training batch runs to its end,
then the full training state (weights, optimiser, scheduler, loop position, the DataModule's epoch position and
augmentation stream, the global RNGs) is written where ``ModelCheckpoint(save_last=True)`` keeps ``last.ckpt``,
and :class:`Interrupted` ends the fit; ``cutmix_pl.cli.main`` turns it into one line and exit status 128 + the
signal number (130 for SIGINT, 143 for SIGTERM). ``fit --ckpt_path last`` continues from that checkpoint. A
second Ctrl-C stops at once, without saving.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["Interrupted", "StopOnSignal", "last_checkpoint_path"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A fit stopped by a signal after saving a checkpoint (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int, checkpoint: str | None, step: int, epoch: int, batch: int) -> None:
        self.signum, self.checkpoint, self.step, self.epoch, self.batch = signum, checkpoint, step, epoch, batch
        name = signal.Signals(signum).name
        saved = f"saved {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"stopped by {name} after global step {step} (epoch {epoch}, batch {batch}); {saved}; "
                         "resume: run the same command with --ckpt_path last")


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` lives for this run: the first ``ModelCheckpoint``'s folder, else ``log_dir/checkpoints``."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    root = trainer.log_dir or trainer.default_root_dir
    return Path(root) / "checkpoints" / "last.ckpt"


class StopOnSignal(Callback):
    """On SIGTERM or SIGINT during fit: end the current batch, save ``last.ckpt``, raise :class:`Interrupted`.

    Args:
        check_every: under DDP, ranks agree on stopping every ``check_every`` steps (a collective); a single
            process checks after every batch, at no cost.
    """

    def __init__(self, check_every: int = 10) -> None:
        self.check_every = max(1, int(check_every))
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    # -- handlers --------------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
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
        self.signum = None
        self._install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self.signum is not None
        if trainer.world_size > 1:
            if (trainer.global_step % self.check_every) != 0:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        # The same point as ModelCheckpoint(every_n_train_steps=...) saves at, so the resume is exact.
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        signum = self.signum if self.signum is not None else signal.SIGTERM
        raise Interrupted(signum, str(path), trainer.global_step, trainer.current_epoch, batch_idx)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._uninstall()
        # Lightning's own SIGTERM handler (active before training starts) ends the loop at a batch boundary too.
        if isinstance(exception, SIGTERMException) and trainer.training and not trainer.sanity_checking:
            trainer.save_checkpoint(last_checkpoint_path(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._uninstall()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._uninstall()

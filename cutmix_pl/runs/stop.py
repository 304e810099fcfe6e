"""A stop on a signal: a fit ends at a batch boundary with a full ``last.ckpt``, anything else in one line.

On the first SIGTERM, SIGHUP or SIGINT during training, the current batch runs to its end, the full training state
(loops, optimiser, the DataModule's epoch position and augmentation stream, the RNGs) goes to ``last.ckpt``, and
:class:`Interrupted` ends the fit (exit status 128 + the signal number); a signal during a validation lets it finish
first. A second Ctrl-C stops at once, unsaved. Outside training, :func:`stop_early_on_signals` raises
:class:`StoppedEarly`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import last_checkpoint_path

__all__ = ["Interrupted", "StopOnSignal", "StoppedEarly", "stop_early_on_signals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class Interrupted(BaseException):
    """A fit stopped by a signal after saving a checkpoint (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int, checkpoint: str | None, step: int, epoch: int, batch: int,
                 resume: str | None = "last") -> None:
        """``resume``: what ``--ckpt_path`` continues the run; None when nothing is left to continue."""
        self.signum, self.checkpoint, self.step, self.epoch, self.batch = signum, checkpoint, step, epoch, batch
        name = signal.Signals(signum).name
        saved = f"saved {checkpoint}" if checkpoint else "nothing saved (stopped at once by a second signal)"
        then = (f"resume: run the same command with --ckpt_path {resume}" if resume else
                "no state had been saved, and the run was removed: run the command again")
        super().__init__(f"stopped by {name} after global step {step} (epoch {epoch}, batch {batch}); {saved}; {then}")


class StoppedEarly(BaseException):
    """A signal outside training (while the command starts, sets up, or evaluates): there is no training state to
    save, so the command stops, and what it wrote is removed as after a failure. A BaseException, like
    KeyboardInterrupt: a reader's ``except Exception`` (a damaged batch file, a failed download) must not take the
    signal for its own error."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} outside training (while starting, evaluating or "
                         "finishing): no training state to save; a fit that had saved a checkpoint resumes with "
                         "--ckpt_path last, else run the command again")


def _swap(handler: Any) -> dict[int, Any]:
    """``handler`` for the stop signals (only the main thread may set one); returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in _SIGNALS}


def _restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stop_early_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`StoppedEarly` while the block runs (StopOnSignal takes over during
    training), instead of killing the process where it stands or printing a KeyboardInterrupt traceback."""

    def stop(signum: int, frame: Any) -> None:
        raise StoppedEarly(signum)

    previous = _swap(stop)
    try:
        yield
    finally:
        _restore(previous)


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
        self._previous = self._previous or _swap(self._handle)

    def _uninstall(self) -> None:
        previous, self._previous = self._previous, {}
        _restore(previous)

    # -- hooks -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum, self._pending, self._trainer = None, None, trainer
        self._install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's last batch: its validation and epoch-end checkpoint come first (on_train_epoch_end)
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return  # inside a gradient accumulation window: the gradients summed so far are in no checkpoint
        if trainer.world_size > 1 and (trainer.global_step % self.check_every) != 0:
            return
        if self._agreed(trainer):
            # The same point as ModelCheckpoint(every_n_train_steps=...) saves at, so the resume is exact. The stop
            # itself waits for the next batch's start, so that Lightning first logs this step's metrics (a resume
            # starts after this step and would never log them).
            self._pending = self._save(trainer, batch_idx, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the epoch's validation, where ModelCheckpoint(save_on_train_epoch_end=True) saves: a checkpoint taken
        # at the last batch, before that validation, resumes without it (Lightning counts the epoch as done). The
        # stop waits for the next epoch's start: Lightning writes the epoch's logged means after this hook.
        if self._agreed(trainer):
            self._pending = self._save(trainer, max(0, trainer.num_training_batches - 1), trainer.current_epoch)

    def _stop_if_saved(self, *hook_args: Any) -> None:
        """End the fit whose stop was saved at the previous hook (once Lightning has logged what came before)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            raise pending

    on_train_batch_start = on_train_epoch_start = _stop_if_saved

    def _agreed(self, trainer: L.Trainer) -> bool:
        """Whether to stop now: this process's flag, or under DDP any rank's (a collective: all ranks call it)."""
        stop = self.signum is not None
        return trainer.strategy.reduce_boolean_decision(stop, all=False) if trainer.world_size > 1 else stop

    def _save(self, trainer: L.Trainer, batch_idx: int, epoch: int) -> Interrupted:
        """Save last.ckpt; return the exception that ends the fit."""
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        signum = self.signum if self.signum is not None else signal.SIGTERM
        # --ckpt_path last looks for the run under the logger's folder: without a logger, the file itself
        return Interrupted(signum, str(path), trainer.global_step, epoch, batch_idx,
                           "last" if trainer.loggers else str(path))

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

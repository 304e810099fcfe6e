"""The run machinery behind the CLI: where a command's run lives and what it may do there, behind one door.

:class:`Command` is all the CLI calls: :meth:`~Command.prepare` before anything is built, the trainer's parts, the
checks once the trainer exists, and :meth:`~Command.cleanup`. A command's config flows one way through it:
``disk.read`` (what the run folder, its checkpoint and its saved config hold, read once) -> ``rules.decide`` (new
run, resume, evaluate, or refuse; pure) -> ``folder.act`` (claim, lock, point the logger). ``stop.py`` turns signals
into a saved stop, ``callbacks.py`` keeps last.ckpt and the config files, ``console.py`` prints.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from ..files import WriteError
from . import disk, folder, rules
from .callbacks import LastCheckpoint
from .console import NOTES, shown
from .folder import AtomicCheckpointIO, Claim, blocked
from .stop import Interrupted

__all__ = ["Command", "is_finished"]

LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
# The variables Lightning reads a process's rank from at import (lightning.fabric.utilities.rank_zero)
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class Command:
    """One command's run: what it reads, decides and claims, and what it undoes if it fails."""

    def __init__(self) -> None:
        self.decision = rules.Decision()
        self.claim: Claim | None = None
        self.ckpt_path: str | None = None

    def prepare(self, sub: str, cfg: Namespace) -> dict[str, Any]:
        """Read -> decide -> act for the parsed ``cfg`` (completed in place); returns the checkpoint's model settings
        that this command takes."""
        other_node_not_rank_zero(int(cfg.trainer.get("num_nodes") or 1))  # before any note: node 0 prints them
        settle_defaults(cfg)
        logger = logger_args(cfg.trainer)
        base = Path(logger.save_dir) / (logger.get("name") or "") if logger is not None else None
        ckpt = cfg.get("ckpt_path")
        seen = disk.read(sub, None if ckpt is None else str(ckpt), base, cfg.get("weights_only"))
        self.decision = rules.decide(sub, cfg, seen, base)
        for text in self.decision.notes:
            NOTES.note(text)
        if cfg.trainer.get("fast_dev_run"):  # Lightning then logs and saves nothing: no folder to claim or report
            return self.decision.taken
        first = _first_logger(cfg.trainer)
        tensorboard = first is not None and str(first.get("class_path", "")).endswith("TensorBoardLogger")
        self.claim = folder.act(self.decision, logger, base, tensorboard)
        return self.decision.taken

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        return self.decision.checkpoint

    @property
    def run(self) -> Path | None:
        return self.claim.folder if self.claim is not None else None

    def trainer_kwargs(self, trainer_cfg: Namespace, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Checkpoints written atomically unless the config brings its own CheckpointIO; last.ckpt saved before the
        config's checkpoints (the resume point first: with room for one file, it is the one kept), its follow-up
        after them."""
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        own, last = trainer_cfg.get("callbacks") or [], LastCheckpoint()
        kwargs.setdefault("callbacks", [last, *(own if isinstance(own, (list, tuple)) else [own]), last.follow_up])
        return kwargs

    def check_checkpoint_dirs(self, trainer: L.Trainer) -> None:
        """Checkpoints of another run in an explicit ModelCheckpoint dirpath would be overwritten: refused (on every
        rank: torchrun and SLURM start them together, and each must stop)."""
        for cb in trainer.checkpoint_callbacks:
            if not (isinstance(cb, ModelCheckpoint) and cb.dirpath):
                continue
            where = Path(cb.dirpath).absolute()
            why = blocked(where)
            if why is not None:
                raise ValueError(f"cannot write the checkpoint folder {where}: {why}; fix: pass a writable dirpath")
            ours = where in self.decision.resumed_dirs or (self.run is not None and self.run in where.parents)
            if any(where.glob("*.ckpt")) and not ours:
                raise ValueError(f"{where} already holds the checkpoints of an earlier run, which this run would "
                                 "overwrite; fix: give this ModelCheckpoint another dirpath, or continue that run with "
                                 "--ckpt_path last")

    def report(self, sub: str, trainer: L.Trainer) -> None:
        """Where the command wrote, and the TensorBoard command that shows it."""
        run = self.run
        if run is None or not trainer.is_global_zero:
            return
        if sub != "fit":
            print(f"cutmix-pl: {sub} wrote {shown(run)} (TensorBoard: tensorboard --logdir "
                  f"{shown(run.parent.parent)})", file=sys.stderr)
        elif trainer.state.finished:
            print(f"cutmix-pl: run {shown(run)}\n  checkpoints: {shown(run / 'checkpoints')} (last.ckpt: the final "
                  f"state)\n  TensorBoard: tensorboard --logdir {shown(run.parent)}", file=sys.stderr)

    def cleanup(self, err: BaseException | None) -> BaseException | None:
        """After the command: the lock released; after a failure, what it wrote removed (unless it saved a last.ckpt),
        and the error to raise in place of ``err``, if another."""
        try:
            kept = err is not None and self.claim is not None and self.claim.failed()
        finally:
            if self.claim is not None:
                self.claim.release()
        if isinstance(err, WriteError) and not kept:  # the run it claimed is gone: nothing to resume
            return WriteError(str(err).replace("then resume with --ckpt_path last", "then run the command again (no "
                                               "state had been saved)"))
        if isinstance(err, Interrupted) and err.checkpoint is None and self.claim is not None and not kept:
            return Interrupted(err.signum, None, err.step, err.epoch, err.batch, resume=None)
        return None


def is_finished(run: Path, config: dict[str, Any] | None = None) -> bool:
    """Whether a run's last.ckpt holds the end its (newest) config asks for; ValueError when a file is unreadable."""
    config = config if config is not None else disk.saved_config(run) or {}
    return rules.is_finished(config, disk.read_progress(run / "checkpoints" / "last.ckpt"))


def settle_defaults(cfg: Namespace) -> None:
    """Choices made for the user, made here so that config.yaml records them (and a resume compares them)."""
    trainer = cfg.trainer
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if max_epochs is not None and max_epochs < 1 and (max_steps is None or max_steps < 1):
        raise ValueError(f"trainer.max_epochs={max_epochs} is out of range: the learning-rate schedules need an end; "
                         "fix: a value >= 1 (or a trainer.max_steps >= 1)")
    for name in LIMITS:
        if trainer.get(name) == 1:  # the CLI parses Trainer's int-or-float limits as floats: 1.0, a fraction
            NOTES.note(f"trainer.{name}=1 reads as 1.0, all batches (a float is a fraction of them); for a few "
                       "batches pass 2 or more")
    for cb in trainer.get("callbacks") or []:
        if isinstance(cb, Namespace) and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            # one last.ckpt per run, overwritten (atomically) by every save, never last-v1.ckpt beside a stale one
            cb.init_args.enable_version_counter = False


def other_node_not_rank_zero(num_nodes: int) -> bool:
    """With Lightning's own launcher on every node (NODE_RANK set, no rank variable), the first process of node 1,
    2, ... reads as rank 0 until the DDP strategy sets its rank, and would claim a run folder of its own: marked as
    not rank 0 (a placeholder the strategy replaces). Returns whether it did; only when there are several nodes."""
    if num_nodes <= 1:
        return False
    try:
        node = int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0)
    except ValueError:  # Lightning's own check names it
        return False
    if rank_zero_only.rank != 0 or node <= 0 or any(key in os.environ for key in _RANK_VARIABLES):
        return False
    rank_zero_only.rank = node
    return True


def _first_logger(trainer_cfg: Namespace) -> Namespace | None:
    logger = trainer_cfg.get("logger")
    logger = (logger[0] if logger else None) if isinstance(logger, list) else logger
    return logger if isinstance(logger, Namespace) else None


def logger_args(trainer_cfg: Namespace) -> Namespace | None:
    """init_args of the (first) logger when it has a save_dir/name/version layout (TensorBoard, CSV)."""
    logger = _first_logger(trainer_cfg)
    args = logger.get("init_args") if logger is not None else None
    return args if isinstance(args, Namespace) and args.get("save_dir") is not None else None

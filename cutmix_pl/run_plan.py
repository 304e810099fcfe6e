"""The run plan of one command: ``runs.py``'s rules applied to a parsed config, before anything is built.

``RunPlan.read`` resolves ``--ckpt_path`` (``last``, a run folder, a file) and reads the checkpoint once;
``RunPlan.place`` points the logger at the folder the command writes into: a new ``version_N`` claimed for a fit,
the run's own folder for a resume (after checking what it changes), ``<run>/<command>/`` for an evaluation of a
checkpoint. The plan holds the
run's lock while the command runs and, when the command fails before it saved a checkpoint, removes what it wrote.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_only

from .runs import (RunLock, changed_settings, claim_version, describe_changes, find_resumable, newest_last,
                   outermost_missing, remove_failed, run_of_checkpoint, saved_config)

__all__ = ["RUN_ENV", "RunPlan", "blocked", "logger_args", "runs_base", "plain", "point_logger", "read_checkpoint"]

# Set by rank 0 for the processes Lightning launches for DDP, which parse the same command again: they must
# write into rank 0's run folder, not claim one of their own.
RUN_ENV = "CUTMIX_PL_RUN"


class RunPlan:
    """Where one command writes, and what it must undo if it fails."""

    def __init__(self) -> None:
        self.run: Path | None = None  # the run folder this command writes into
        self.before: set[Path] | None = None  # what that folder held before (None: this command created it)
        self.top: Path | None = None  # the outermost folder the claim created
        self.lock: RunLock | None = None
        self.checkpoint: dict[str, Any] | None = None  # the --ckpt_path checkpoint, read once

    def failed(self) -> None:
        """The command failed: remove what it wrote, unless it saved a checkpoint (rank 0, which wrote it)."""
        if self.run is not None and rank_zero_only.rank == 0:
            remove_failed(self.run, self.before, self.top)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def read(self, sub: str, cfg: Namespace) -> None:
        """Resolve ``cfg.ckpt_path`` (``last``, a run folder, a file) and read the checkpoint once."""
        ckpt = cfg.get("ckpt_path")
        if ckpt is not None and ckpt not in ("best", "hpc") and "://" not in str(ckpt):
            cfg.ckpt_path = str(self._resolve_checkpoint(sub, cfg, str(ckpt), logger_args(cfg.trainer)))
            self.checkpoint = read_checkpoint(cfg)

    def place(self, sub: str, cfg: Namespace) -> None:
        """Point ``cfg``'s logger at this command's folder: a claimed new run, the resumed run (after checking what
        the resume changes; locked), or ``<run>/<command>/`` for an evaluation of a checkpoint."""
        logger = logger_args(cfg.trainer)
        if logger is None:
            return  # no save_dir/name/version layout: Lightning's own folders
        ckpt = cfg.get("ckpt_path")
        has_run = ckpt is not None and Path(ckpt).is_file()
        if sub != "fit":
            if has_run:  # evaluation of a checkpoint: into <run>/<command>/, beside the run's own logs
                point_logger(logger, run_of_checkpoint(ckpt) / sub)
                if _is_tensorboard(cfg):
                    logger.default_hp_metric = False  # not a run of its own: no placeholder hp_metric of -1 there
            return
        resumed = run_of_checkpoint(ckpt) if has_run else None
        if resumed is not None and saved_config(resumed) is not None:
            self._resume_into(resumed, cfg, logger)
        else:
            self._new_run(cfg, logger)

    def _resolve_checkpoint(self, sub: str, cfg: Namespace, ckpt: str, logger: Namespace | None) -> Path:
        if ckpt == "last":
            if logger is None:
                raise ValueError("--ckpt_path last needs a logger with a save_dir (the run folders live there); fix: "
                                 "pass --ckpt_path PATH to a .ckpt file or run folder")
            base = runs_base(logger)
            if sub != "fit":
                last = newest_last(base)
                print(f"cutmix-pl: --ckpt_path last is {last}", file=sys.stderr)
                return last
            run = find_resumable(base, plain(cfg))
            return run / "checkpoints" / "last.ckpt"
        path = Path(ckpt)
        if path.is_dir():  # a run folder
            path = path / "checkpoints" / "last.ckpt"
            if not path.is_file():
                raise ValueError(f"--ckpt_path {ckpt} is a folder without checkpoints/last.ckpt; fix: pass a run "
                                 "folder (runs/<name>/version_N) or a .ckpt file")
        elif not path.is_file():
            raise ValueError(f"--ckpt_path {ckpt} does not exist; fix: pass the path of a .ckpt file (e.g. "
                             "runs/<name>/version_N/checkpoints/last.ckpt), a run folder, or --ckpt_path last")
        return path

    def _resume_into(self, run: Path, cfg: Namespace, logger: Namespace) -> None:
        """A resume continues in the run's own folder, with the run's settings (or the few it may change)."""
        changes = changed_settings(saved_config(run) or {}, plain(cfg))
        if changes:
            raise ValueError(f"cannot resume {run} with changed settings: {describe_changes(changes)}; fix: "
                             f"leave them as the run has them ({run}/config.yaml), or leave out --ckpt_path to start "
                             "a new run with them")
        point_logger(logger, run)
        # its checkpoints folder holds its own checkpoints, which this fit continues: no warning that it is not empty
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        if _is_tensorboard(cfg):
            # TensorBoard hides the run's events from the checkpoint's step on, which the resumed run logs again
            # (after a kill, steps past the newest checkpoint were logged once already): no doubled stretch.
            logger.purge_step = int((self.checkpoint or {}).get("global_step", 0))
        if rank_zero_only.rank == 0:
            print(f"cutmix-pl: resuming {cfg.ckpt_path} (the run continues in {run})", file=sys.stderr)
            self._take(run, created=False)
            for stale in (run / "checkpoints").glob(".*.tmp"):  # a save killed half-way; the target is intact
                stale.unlink(missing_ok=True)

    def _new_run(self, cfg: Namespace, logger: Namespace) -> None:
        """A new fit claims its own version_N folder atomically (rank 0; launched DDP ranks reuse it)."""
        base = runs_base(logger)
        if rank_zero_only.rank != 0:
            if os.environ.get(RUN_ENV):
                point_logger(logger, Path(os.environ[RUN_ENV]))
            return
        why = blocked(base)
        if why is not None:
            raise ValueError(f"cannot write the run folder {base}: {why}; fix: pass "
                             "--trainer.logger.init_args.save_dir DIR with a writable folder")
        self.top = outermost_missing(base)
        version = logger.get("version")
        if version is None:
            run = claim_version(base)
            self._take(run, created=True)
        else:
            run = base / (version if isinstance(version, str) else f"version_{version}")
            ckpts = run / "checkpoints"
            if ckpts.is_dir() and any(ckpts.glob("*.ckpt")):
                raise ValueError(f"{ckpts} already holds the checkpoints of an earlier run, which this run would "
                                 "overwrite; fix: leave out trainer.logger.init_args.version (each run gets a new "
                                 "version_N folder), or continue that run with --ckpt_path last")
            created = not run.exists()
            run.mkdir(parents=True, exist_ok=True)
            self._take(run, created=created)
        point_logger(logger, run)
        os.environ[RUN_ENV] = str(run.absolute())

    def _take(self, run: Path, created: bool) -> None:
        self.run, self.before = run, None if created else set(run.rglob("*"))
        self.lock = RunLock(run)
        self.lock.acquire()


def _first_logger(trainer_cfg: Namespace) -> Namespace | None:
    logger = trainer_cfg.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return logger if isinstance(logger, Namespace) else None


def logger_args(trainer_cfg: Namespace) -> Namespace | None:
    """init_args of the (first) logger when it has a save_dir/name/version layout (TensorBoard, CSV)."""
    logger = _first_logger(trainer_cfg)
    args = logger.get("init_args") if logger is not None else None
    return args if isinstance(args, Namespace) and args.get("save_dir") is not None else None


def _is_tensorboard(cfg: Namespace) -> bool:
    """Whether the logger that logger_args describes is TensorBoard's."""
    logger = _first_logger(cfg.trainer)
    return logger is not None and str(logger.get("class_path", "")).endswith("TensorBoardLogger")


def runs_base(logger: Namespace) -> Path:
    """The folder that holds the logger's ``version_N`` runs: ``<save_dir>/<name>``."""
    return Path(logger.save_dir) / (logger.get("name") or "")


def blocked(path: Path) -> str | None:
    """Why ``path`` (a folder, perhaps not there yet) cannot be created and written, or None if it can."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def plain(value: Any) -> Any:
    """A parsed config as YAML would hold it (paths and other objects as strings), for comparing with a saved one."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def point_logger(logger: Namespace, folder: Path) -> None:
    """Make the logger's log_dir ``folder`` (absolute, so the run is the same from any working directory)."""
    folder = folder.absolute()
    logger.save_dir, logger.name, logger.version = str(folder.parent.parent), folder.parent.name, folder.name


def read_checkpoint(cfg: Namespace) -> dict[str, Any]:
    """Read the checkpoint once, so a bad one ends here, in one line, before anything is written."""
    ckpt = cfg.ckpt_path
    try:  # as Lightning will load it (torch's weights_only default unless --weights_only says otherwise)
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=cfg.get("weights_only"))
    except Exception as err:  # truncated zip, not a torch file, a global weights_only refuses, ...
        detail = " ".join(str(err).split())
        if "Weights only load failed" in detail:
            raise ValueError(f"--ckpt_path {ckpt} holds objects that a weights-only load refuses; fix: pass "
                             "--weights_only false if you trust the file") from None
        raise ValueError(f"--ckpt_path {ckpt} is not a readable checkpoint ({type(err).__name__}: "
                         f"{detail[:200]}); fix: pass an intact .ckpt file (e.g. an earlier one of the run, "
                         "step*.ckpt or best-*.ckpt) or leave out --ckpt_path to train from scratch") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"--ckpt_path {ckpt} is not a Lightning checkpoint (no state_dict); fix: pass a .ckpt "
                         "file written by this project")
    return checkpoint

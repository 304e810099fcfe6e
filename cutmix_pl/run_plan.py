"""The run plan of one command: ``runs.py``'s rules applied to a parsed config, before anything is built.

:meth:`RunPlan.prepare` settles the choices made for the user, resolves ``--ckpt_path`` (``last``, a run folder, a
file) and reads the checkpoint once, checks what the command asks against the checkpoint and the run, and points the
logger at the folder the command writes into: a new ``version_N`` claimed for a fit, the run's own folder for a
resume, ``<run>/<command>/`` for an evaluation of a checkpoint. The plan holds that folder's lock while the command
runs and, when the command fails, removes what it wrote there (unless it saved a ``last.ckpt`` to resume from).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_only

from .runs import (FIT_FILES, LOCK, RunLock, changed_settings, claim_version, clear_temporary, describe_changes,
                   find_resumable, newest_last, outermost_missing, remove_failed, run_of_checkpoint, saved_config,
                   snapshot, symlinks_in)
from .settings import (check_loose_checkpoint, checked_hparams, choose_for_machine, keep_run_seed, note, plain,
                       read_checkpoint, settle_defaults, split_from_checkpoint)

__all__ = ["RUN_ENV", "RunPlan", "blocked", "logger_args", "other_node_not_rank_zero", "point_logger", "runs_base",
           "shown"]

# Set by rank 0 for the processes Lightning launches for DDP, which parse the same command again: they must
# write into rank 0's run folder, not claim one of their own.
RUN_ENV = "CUTMIX_PL_RUN"
# The variables Lightning reads a process's rank from at import (lightning.fabric.utilities.rank_zero)
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def other_node_not_rank_zero(num_nodes: int) -> bool:
    """With Lightning's own launcher on every node of a multi-node run (NODE_RANK set, no rank variable), the first
    process of node 1, 2, ... reads as rank 0 until the DDP strategy sets its global rank: it would claim a run folder
    of its own. Mark it as not rank 0 (a placeholder the strategy replaces); returns whether it did. Only when the
    command runs on several nodes: a NODE_RANK left in the environment of a one-process run changes nothing."""
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


class RunPlan:
    """Where one command writes, what it takes from the checkpoint, and what it must undo if it fails."""

    def __init__(self) -> None:
        self.run: Path | None = None  # the folder this command writes into (a run, or <run>/<command>)
        self.before: dict[Path, int] | None = None  # what that folder held before (None: this command created it)
        self.top: Path | None = None  # the outermost folder the claim created
        self.only: tuple[str, ...] | None = None  # what a failure removes when the folder holds other files too
        self.lock: RunLock | None = None
        self.checkpoint: dict[str, Any] | None = None  # the --ckpt_path checkpoint, read once
        self.ckpt_path: str | None = None
        # the ModelCheckpoint folders recorded by the run a fit resumes (an explicit dirpath may lie outside the run)
        self.resumed_dirs: set[Path] = set()

    def failed(self) -> bool:
        """The command failed: remove what it wrote, unless it saved a last.ckpt (rank 0, which wrote it). Returns
        whether the run holds a last.ckpt to resume from."""
        if self.run is not None and rank_zero_only.rank == 0:
            return remove_failed(self.run, self.before, self.top, self.only)
        return False

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def prepare(self, sub: str, cfg: Namespace) -> dict[str, Any]:
        """Apply the run rules to ``cfg`` (in place); return the checkpoint's model settings that this command takes
        (all but its run options, which are the command's own)."""
        other_node_not_rank_zero(int(cfg.trainer.get("num_nodes") or 1))  # before any note: node 0 prints them
        settle_defaults(cfg)
        if sub != "fit" and cfg.get("ckpt_path") is None:
            raise ValueError(f"{sub} needs --ckpt_path: without one it would evaluate an untrained network; fix: "
                             "pass a run folder (runs/<name>/version_N), a .ckpt file, or last (the newest "
                             "run's last.ckpt)")
        ckpt = cfg.get("ckpt_path")
        if ckpt == "best":  # Lightning's name for the best model of a fit in the same Python process
            raise ValueError("--ckpt_path best names the best checkpoint of a fit run in the same Python process, "
                             "which a command of its own does not have; fix: pass the run's "
                             "checkpoints/best-epochNNN.ckpt, a run folder (runs/<name>/version_N), or last")
        if ckpt is not None and ckpt != "hpc" and "://" not in str(ckpt):
            cfg.ckpt_path = str(self._resolve_checkpoint(sub, cfg, str(ckpt), logger_args(cfg.trainer)))
            self.checkpoint = read_checkpoint(cfg)
        try:
            resumed = saved_config(run_of_checkpoint(cfg.ckpt_path)) if sub == "fit" and self.checkpoint else None
        except ValueError as err:
            raise ValueError(f"{err}; fix: repair that file, or move it away (the run's previous config file then "
                             "counts)") from None
        choose_for_machine(cfg, resumed or {}, training=sub == "fit")
        keep_run_seed(cfg, resumed or {})
        taken: dict[str, Any] = {}
        if self.checkpoint is not None:
            taken = checked_hparams(cfg, self.checkpoint)
            if sub == "fit" and resumed is None:
                check_loose_checkpoint(cfg, taken)
            if sub == "validate":
                split_from_checkpoint(cfg, self.checkpoint)
        self._place(sub, cfg, resumed)
        return taken

    # -- which checkpoint ------------------------------------------------------------------------------------
    def _resolve_checkpoint(self, sub: str, cfg: Namespace, ckpt: str, logger: Namespace | None) -> Path:
        if ckpt == "last":
            if logger is None:
                raise ValueError("--ckpt_path last needs a logger with a save_dir (the run folders live there); fix: "
                                 "pass --ckpt_path PATH to a .ckpt file or run folder")
            if sub != "fit":
                last = newest_last(runs_base(logger))
                note(f"--ckpt_path last is {shown(last)}")
                return last
            return find_resumable(runs_base(logger), plain(cfg)) / "checkpoints" / "last.ckpt"
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

    # -- where the command writes --------------------------------------------------------------------------
    def _place(self, sub: str, cfg: Namespace, resumed: dict[str, Any] | None) -> None:
        logger = logger_args(cfg.trainer)
        tensorboard = logger is not None and _is_tensorboard(cfg)
        if sub != "fit":
            if self.checkpoint is not None and logger is not None:  # into <run>/<command>/, beside the run's logs
                folder = run_of_checkpoint(cfg.ckpt_path) / sub
                if rank_zero_only.rank == 0:  # DDP-launched ranks parse the command again: rank 0 holds the folder
                    self._take(folder, "the evaluation folder", "copy the checkpoint into a writable folder and pass "
                               "that path to --ckpt_path")
                point_logger(logger, folder)
                if tensorboard:  # not a run of its own: no placeholder hp_metric; this evaluation hides earlier ones
                    logger.default_hp_metric, logger.purge_step = False, 0
            return
        if logger is None:  # no save_dir/name/version layout (a logger false): Lightning writes into default_root_dir
            self._unlogged_fit(cfg, resumed)
        elif resumed is not None:
            self._resume_into(run_of_checkpoint(cfg.ckpt_path), cfg, logger, resumed)
            if tensorboard:
                # TensorBoard hides the run's events from the checkpoint's step on, which the resumed run logs again
                # (after a kill, steps past the newest checkpoint were logged once already); no second placeholder
                # hp_metric at step 0, which would hide the tag's earlier points.
                logger.purge_step = int((self.checkpoint or {}).get("global_step", 0))
                logger.default_hp_metric = False
        else:
            self._new_run(logger)

    def _resume_into(self, run: Path, cfg: Namespace, logger: Namespace, saved: dict[str, Any]) -> None:
        """A resume continues in the run's own folder, with the run's settings (or the few it may change)."""
        changes = changed_settings(saved, plain(cfg))
        if changes:
            raise ValueError(f"cannot resume {run} with changed settings: {describe_changes(changes)}; fix: "
                             f"leave them as the run has them ({run}/config.yaml), or leave out --ckpt_path to start "
                             "a new run with them")
        point_logger(logger, run)
        self._continue_checkpoints(run)
        if rank_zero_only.rank == 0:
            note(f"resuming {shown(Path(cfg.ckpt_path))} (the run continues in {shown(run)})")
            self._take(run, "the run folder", "pass --trainer.logger.init_args.save_dir DIR with a writable folder")

    def _new_run(self, logger: Namespace) -> None:
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
        created = version is None
        if version is None:
            run = claim_version(base)
        else:
            run = base / (version if isinstance(version, str) else f"version_{version}")
            _refuse_earlier_run(run, "leave out trainer.logger.init_args.version (each run gets a new version_N "
                                "folder)")
        self._take(run, "the run folder", "pass --trainer.logger.init_args.save_dir DIR with a writable folder",
                   created or None)
        point_logger(logger, run)
        os.environ[RUN_ENV] = str(run.absolute())

    def _unlogged_fit(self, cfg: Namespace, resumed: dict[str, Any] | None) -> None:
        """Without a logger, a fit writes config.yaml and checkpoints/ into trainer.default_root_dir: one run there."""
        folder = Path(cfg.trainer.get("default_root_dir") or ".").absolute()
        continues = resumed is not None and run_of_checkpoint(cfg.ckpt_path) == folder
        if continues:
            self._continue_checkpoints(folder)
        if rank_zero_only.rank != 0:
            return
        if not continues:
            _refuse_earlier_run(folder, "run it from another folder or pass --trainer.default_root_dir DIR")
        # the folder may hold the data it downloaded, or code: the fit looks at and removes only what a fit writes
        self.top = outermost_missing(folder)
        self._take(folder, "the run folder", "pass --trainer.default_root_dir DIR with a writable folder",
                   only=FIT_FILES)

    def _continue_checkpoints(self, run: Path) -> None:
        """The fit continues ``run``: its checkpoint folders, as its checkpoint records them (an explicit dirpath may
        lie outside the run), are this fit's own, and their checkpoints no surprise (no warning that they are not
        empty)."""
        states = (self.checkpoint or {}).get("callbacks")
        states = states if isinstance(states, dict) else {}
        dirs = [state.get("dirpath") for state in states.values() if isinstance(state, dict)]
        self.resumed_dirs = {Path(d) for d in dirs if isinstance(d, str) and d}
        for folder in {*self.resumed_dirs, run.resolve() / "checkpoints"}:
            warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(str(folder))} exists and "
                                    "is not empty")

    def _take(self, folder: Path, what: str, fix: str, created: bool | None = None,
              only: tuple[str, ...] | None = None) -> None:
        """Make ``folder`` this command's: refused when it cannot be written or holds a symbolic link (a write through
        it would land outside the run), locked, cleared of the temporary files of killed writes."""
        folder = folder.absolute()
        why = blocked(folder)
        links = symlinks_in(folder, only)
        if why is None and links:
            why, fix = f"{links[0]} is a symbolic link (a command writes only inside its run)", "remove the link"
        if why is not None:
            raise ValueError(f"cannot write {what} {folder}: {why}; fix: {fix}")
        created = not folder.exists() if created is None else created
        lock_added = not os.path.lexists(folder / LOCK)
        folder.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(folder)
        self.lock.acquire()
        clear_temporary(folder, only)
        clear_temporary(folder / "checkpoints")
        before = None if created else snapshot(folder, only)  # under the lock: no other command writes there
        if before is not None and lock_added:  # a failure removes the lock file it added
            before.pop(folder / LOCK, None)
        self.run, self.before, self.only = folder, before, only


def _refuse_earlier_run(folder: Path, fix: str) -> None:
    ckpts = folder / "checkpoints"
    if (ckpts.is_dir() and any(ckpts.glob("*.ckpt"))) or (folder / "config.yaml").is_file():
        raise ValueError(f"{folder.absolute()} already holds an earlier run, which this run would overwrite; fix: "
                         f"{fix}, or continue that run with --ckpt_path {shown(folder)}")


# -- small helpers -----------------------------------------------------------------------------------------
def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when it lies below it."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


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


def point_logger(logger: Namespace, folder: Path) -> None:
    """Make the logger's log_dir ``folder`` (absolute, so the run is the same from any working directory). A
    ``version_N`` folder is given as the number N, which the progress bar shows as ``v_num=N``."""
    folder = folder.absolute()
    number = folder.name[len("version_"):]
    logger.save_dir, logger.name = str(folder.parent.parent), folder.parent.name
    logger.version = int(number) if folder.name.startswith("version_") and number.isdigit() else folder.name

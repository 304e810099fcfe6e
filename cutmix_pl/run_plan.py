"""The run plan of one command: ``runs.py``'s rules applied to a parsed config, before anything is built.

:meth:`RunPlan.prepare` settles the choices made for the user, resolves ``--ckpt_path`` (``last``, a run folder, a
file) and reads the checkpoint once, checks what the command asks against the checkpoint and the run, and points the
logger at the folder the command writes into: a new ``version_N`` claimed for a fit, the run's own folder for a
resume, ``<run>/<command>/`` for an evaluation of a checkpoint. The plan holds that folder's lock while the command
runs and, when the command fails, removes what it wrote there (unless it saved a ``last.ckpt`` to resume from).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_only

from . import hardware
from .nets import net_differences
from .runs import (RunLock, changed_settings, claim_version, clear_temporary, describe_changes, find_resumable,
                   flatten, newest_last, outermost_missing, remove_failed, run_of_checkpoint, run_options, same_value,
                   saved_config, snapshot, symlinks_in)

__all__ = ["RUN_ENV", "RunPlan", "blocked", "logger_args", "note", "plain", "point_logger", "read_checkpoint",
           "runs_base", "shown"]

# Set by rank 0 for the processes Lightning launches for DDP, which parse the same command again: they must
# write into rank 0's run folder, not claim one of their own.
RUN_ENV = "CUTMIX_PL_RUN"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "cutmix.yaml"
LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
# DataModule arguments that say which training images were held out for validation: ``validate`` takes the run's.
SPLIT_KEYS = ("val_size", "split_seed")


class RunPlan:
    """Where one command writes, what it takes from the checkpoint, and what it must undo if it fails."""

    def __init__(self) -> None:
        self.run: Path | None = None  # the folder this command writes into (a run, or <run>/<command>)
        self.before: dict[Path, int] | None = None  # what that folder held before (None: this command created it)
        self.top: Path | None = None  # the outermost folder the claim created
        self.lock: RunLock | None = None
        self.checkpoint: dict[str, Any] | None = None  # the --ckpt_path checkpoint, read once
        self.ckpt_path: str | None = None

    def failed(self) -> bool:
        """The command failed: remove what it wrote, unless it saved a last.ckpt (rank 0, which wrote it). Returns
        whether the run holds a last.ckpt to resume from."""
        if self.run is not None and rank_zero_only.rank == 0:
            return remove_failed(self.run, self.before, self.top)
        return False

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def prepare(self, sub: str, cfg: Namespace) -> dict[str, Any]:
        """Apply the run rules to ``cfg`` (in place); return the checkpoint's model settings that this command takes
        (its run options and what it sets otherwise left out)."""
        settle_defaults(cfg)
        if sub != "fit" and cfg.get("ckpt_path") is None:
            raise ValueError(f"{sub} needs --ckpt_path: without one it would evaluate an untrained network; fix: "
                             "pass a run folder (runs/<name>/version_N), a .ckpt file, or last (the newest "
                             "run's last.ckpt)")
        ckpt = cfg.get("ckpt_path")
        if ckpt is not None and ckpt not in ("best", "hpc") and "://" not in str(ckpt):
            cfg.ckpt_path = str(self._resolve_checkpoint(sub, cfg, str(ckpt), logger_args(cfg.trainer)))
            self.checkpoint = read_checkpoint(cfg)
        try:
            resumed = saved_config(run_of_checkpoint(cfg.ckpt_path)) if sub == "fit" and self.checkpoint else None
        except ValueError as err:
            raise ValueError(f"{err}; fix: repair that file, or move it away (the run's previous config file then "
                             "counts)") from None
        choose_for_machine(cfg, resumed or {})
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
        # its checkpoints folder holds its own checkpoints, which this fit continues: no warning that it is not empty
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
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
        if rank_zero_only.rank != 0:
            return
        if resumed is None or run_of_checkpoint(cfg.ckpt_path) != folder:
            _refuse_earlier_run(folder, "run it from another folder or pass --trainer.default_root_dir DIR")
        # locked, not tracked: a failed command there must not remove what else it added (downloaded data, ...)
        self._take(folder, "the run folder", "pass --trainer.default_root_dir DIR with a writable folder", track=False)

    def _take(self, folder: Path, what: str, fix: str, created: bool | None = None, track: bool = True) -> None:
        """Make ``folder`` this command's: refused when it cannot be written or holds a symbolic link (a write through
        it would land outside the run), locked, cleared of the temporary files of killed writes."""
        folder = folder.absolute()
        why = blocked(folder)
        links = symlinks_in(folder)
        if why is None and links:
            why, fix = f"{links[0]} is a symbolic link (a command writes only inside its run)", "remove the link"
        if why is not None:
            raise ValueError(f"cannot write {what} {folder}: {why}; fix: {fix}")
        created = not folder.exists() if created is None else created
        folder.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(folder)
        self.lock.acquire()
        for sub in (folder, folder / "checkpoints"):
            clear_temporary(sub)
        if track:
            self.run, self.before = folder, None if created else snapshot(folder)


def _refuse_earlier_run(folder: Path, fix: str) -> None:
    ckpts = folder / "checkpoints"
    if (ckpts.is_dir() and any(ckpts.glob("*.ckpt"))) or (folder / "config.yaml").is_file():
        raise ValueError(f"{folder.absolute()} already holds an earlier run, which this run would overwrite; fix: "
                         f"{fix}, or continue that run with --ckpt_path {shown(folder)}")


# -- choices made for the user, and what comes from the checkpoint ---------------------------------------------
def settle_defaults(cfg: Namespace) -> None:
    """Choices made for the user, made here so that config.yaml records them (and a resume compares them)."""
    trainer = cfg.trainer
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if max_epochs is not None and max_epochs < 1 and (max_steps is None or max_steps < 1):
        raise ValueError(f"trainer.max_epochs={max_epochs} is out of range: the learning-rate schedules need an "
                         "end; fix: a value >= 1 (or a trainer.max_steps >= 1)")
    for name in LIMITS:
        if trainer.get(name) == 1:
            # Lightning reads a float as a fraction, and the CLI parses Trainer's int-or-float limits as floats
            note(f"trainer.{name}=1 reads as 1.0, all batches (a float is a fraction of them); for a few batches "
                 "pass 2 or more")
    for cb in trainer.get("callbacks") or []:
        if isinstance(cb, Namespace) and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            # one last.ckpt per run, overwritten (atomically) by every save, never last-v1.ckpt beside a stale one
            cb.init_args.enable_version_counter = False


def choose_for_machine(cfg: Namespace, resumed: dict[str, Any]) -> None:
    """Precision and memory format left null: the fastest measured safe here (``hardware.py``), printed and recorded
    in config.yaml. A resumed run keeps what it ran with, so that it continues as it would have."""
    trainer, model = cfg.trainer, cfg.model
    if trainer.precision is None:
        trainer.precision = (resumed.get("trainer") or {}).get("precision")
    if model.get("channels_last") is None:
        model.channels_last = (resumed.get("model") or {}).get("channels_last")
    if trainer.precision is None or model.channels_last is None:
        choice, chosen = hardware.choose(trainer.accelerator), []
        hint = choice.hint if trainer.precision is None else ""  # the hint is about precision
        if trainer.precision is None:
            trainer.precision = choice.precision
            chosen.append(f"trainer.precision={choice.precision}")
        if model.channels_last is None:
            model.channels_last = choice.channels_last
            chosen.append(f"model.channels_last={str(choice.channels_last).lower()}")
        note(f"{', '.join(chosen)} (the fastest measured safe on {choice.why}; set them to override)"
             + (f"; {hint}" if hint else ""))


def checked_hparams(cfg: Namespace, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's model settings this command takes: all but the run options (the command's own). Its network
    class must be the command's: a class named by a file is code that loading it would import and run."""
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams, dict) or not isinstance(hparams.get("net", {}), dict):
        raise ValueError(f"--ckpt_path {cfg.ckpt_path} records its model settings in an unknown form "
                         f"({type(hparams).__name__}); fix: pass a .ckpt file written by this project")
    saved, asked = hparams.get("net"), plain(cfg.model.get("net"))
    if isinstance(saved, dict) and isinstance(asked, dict):
        diffs = net_differences(saved, asked)
        if diffs and (diffs[0][0] == "class_path" or net_differences(_recipe_net(), asked)):
            key, old, new = diffs[0]
            flag = f"--model.net {old}" if key == "class_path" else f"--model.net.{key} {old}"
            why = " (a network class is code: it is taken from a checkpoint only when the command names it)" if (
                key == "class_path") else " (or leave it out: the checkpoint's is used)"
            raise ValueError(f"--ckpt_path {cfg.ckpt_path} holds a model with {key}={old!r} but the config asks for "
                             f"{key}={new!r}; fix: pass {flag}{why}, or leave out --ckpt_path to train from scratch")
        for key, old, _ in diffs:
            note(f"model.net {key}={old!r} from the checkpoint")
    return {k: v for k, v in hparams.items() if k not in run_options() and not k.startswith("_")}


def check_loose_checkpoint(cfg: Namespace, taken: dict[str, Any]) -> None:
    """``fit --ckpt_path`` of a checkpoint outside a run folder (no config.yaml to compare the command with): it
    trains on with the model settings it records, so one that this command sets otherwise (by a --config or flag:
    it differs from the recipe) is refused in one line rather than ignored; the others are named."""
    saved, asked = flatten(taken), flatten(plain(cfg.model))
    recipe = flatten(_recipe().get("model") or {})
    differ = [k for k in sorted(set(saved) & set(asked)) if not same_value(saved[k], asked[k])
              and not k.startswith(("net.", "num_classes"))]
    refused = [k for k in differ if k in recipe and not same_value(recipe[k], asked[k])]
    if refused:
        text = ", ".join(f"model.{k} ({saved[k]!r} there, {asked[k]!r} asked)" for k in refused)
        raise ValueError(f"--ckpt_path {cfg.ckpt_path} continues with the model settings it was trained with, "
                         f"but this command asks for others: {text}; fix: leave them out, or leave out "
                         "--ckpt_path to start a new run with them")
    for key in differ:
        note(f"model.{key}={saved[key]!r} from the checkpoint")


def split_from_checkpoint(cfg: Namespace, checkpoint: dict[str, Any]) -> None:
    """``validate`` of a checkpoint validates on its run's held-out images: another split would hold images the run
    trained on (a short.yaml run, val_size 0, trained on all 50,000). test and predict use the test set."""
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    for key in SPLIT_KEYS:
        if isinstance(saved, dict) and key in saved and key in cfg.data and saved[key] != cfg.data[key]:
            note(f"data.{key}={saved[key]!r} from the checkpoint, not {cfg.data[key]!r}: the run's validation split "
                 "(another would hold images it trained on)")
            cfg.data[key] = saved[key]


def _recipe() -> dict[str, Any]:
    """The default recipe, configs/cutmix.yaml, as a dict."""
    return (yaml.safe_load(DEFAULT_CONFIG.read_text()) if DEFAULT_CONFIG.is_file() else None) or {}


def _recipe_net() -> dict[str, Any]:
    return (_recipe().get("model") or {}).get("net") or {"class_path": "cutmix_pl.resnet.ResNet"}


# -- small helpers -----------------------------------------------------------------------------------------
def note(text: str) -> None:
    """A line about this command's settings, once: DDP-launched ranks parse the same command again."""
    if rank_zero_only.rank == 0:
        print(f"cutmix-pl: {text}", file=sys.stderr)


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
    """Make the logger's log_dir ``folder`` (absolute, so the run is the same from any working directory). A
    ``version_N`` folder is given as the number N, which the progress bar shows as ``v_num=N``."""
    folder = folder.absolute()
    number = folder.name[len("version_"):]
    logger.save_dir, logger.name = str(folder.parent.parent), folder.parent.name
    logger.version = int(number) if folder.name.startswith("version_") and number.isdigit() else folder.name


def read_checkpoint(cfg: Namespace) -> dict[str, Any]:
    """Read the checkpoint once, so a bad one ends here, in one line, before anything is written."""
    ckpt = cfg.ckpt_path
    try:  # as Lightning will load it (torch's weights_only default unless --weights_only says otherwise)
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=cfg.get("weights_only"))
    except Exception as err:  # truncated zip, not a torch file, a global weights_only refuses, ...
        detail = " ".join(str(err).split())
        if "Weights only load failed" in detail:
            raise ValueError(f"--ckpt_path {ckpt} holds objects that a weights-only load refuses; fix: pass "
                             "--weights_only false if you trust the file (loading it runs code it names)") from None
        raise ValueError(f"--ckpt_path {ckpt} is not a readable checkpoint ({type(err).__name__}: "
                         f"{detail[:200]}); fix: pass an intact .ckpt file (e.g. an earlier one of the run, "
                         "step*.ckpt or best-*.ckpt) or leave out --ckpt_path to train from scratch") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"--ckpt_path {ckpt} is not a Lightning checkpoint (no state_dict); fix: pass a .ckpt "
                         "file written by this project")
    return checkpoint

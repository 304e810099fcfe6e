"""``python -m cutmix_pl {fit,validate,test,predict}``: the Lightning CLI over the model and the DataModule.

With no ``--config``, ``configs/cutmix.yaml`` (the default recipe) is loaded; each further ``--config`` is
applied on top of it, then command-line flags.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import Interrupted, StopOnSignal
from .data import CIFAR10DataModule
from .module import ImageClassifier

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "cutmix.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class SaveConfigNoOverwrite(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder; a resumed run adds ``config.resume1.yaml``, ... next to it."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and not self.overwrite and trainer.log_dir:
            stem, ext = os.path.splitext(self.config_filename)
            name, k = self.config_filename, 0
            log_dir = trainer.log_dir  # a broadcast under DDP: every rank must make it, so not in rank 0's loop
            while trainer.is_global_zero and os.path.exists(os.path.join(log_dir, name)):
                k += 1
                name = f"{stem}.resume{k}{ext}"
            self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)


def _logger_args(trainer_cfg: Namespace) -> Namespace | None:
    """init_args of the (first) logger when it has a save_dir/name/version layout (TensorBoard, CSV)."""
    logger = trainer_cfg.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    args = logger.get("init_args") if isinstance(logger, Namespace) else None
    return args if isinstance(args, Namespace) and args.get("save_dir") is not None else None


def _version_value(folder: Path) -> int | str:
    m = re.fullmatch(r"version_(\d+)", folder.name)
    return int(m.group(1)) if m else folder.name


# Model arguments that say how to run the network, not what it is: taken from this run's config even when a
# checkpoint is loaded (its other hyperparameters win, as Lightning does).
RUN_OPTIONS = ("tta_flip", "compile", "channels_last", "log_images", "grid_size")


def _blocked(path: Path) -> str | None:
    """Why ``path`` (a folder, perhaps not there yet) cannot be created and written, or None if it can."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


class CutMixCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        if trainer.precision is None:  # bf16 autocast where it pays (GPUs); full precision on CPUs
            on_gpu = torch.cuda.is_available() and trainer.accelerator in ("auto", "gpu", "cuda")
            trainer.precision = "bf16-mixed" if on_gpu else "32-true"

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # name the config key of a failing class (data.mixer...), not just the class
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            raise ValueError(_concise(err, cfg)) from None

    # -- checkpoints: `--ckpt_path last` continues the newest run of this logger name, in its own folder --------
    def _resolve_ckpt_path(self, cfg: Namespace, sub: str) -> None:
        ckpt = cfg.get("ckpt_path")
        if ckpt is None or ckpt in ("best", "hpc") or "://" in str(ckpt):
            return
        if ckpt != "last":
            if not Path(ckpt).is_file():
                raise ValueError(f"--ckpt_path {ckpt} does not exist; fix: pass the path of a .ckpt file (e.g. "
                                 "runs/<name>/version_N/checkpoints/last.ckpt) or --ckpt_path last")
            return
        args = _logger_args(cfg.trainer)
        if args is None:
            return  # no save_dir/name layout: Lightning looks in the ModelCheckpoint folders itself
        base = Path(args.save_dir) / (args.get("name") or "")
        version = args.get("version")
        if version is not None:
            folders = [base / (version if isinstance(version, str) else f"version_{version}")]
        else:
            folders = [d for d in base.glob("version_*") if d.is_dir()]
        found = [d / "checkpoints" / "last.ckpt" for d in folders if (d / "checkpoints" / "last.ckpt").is_file()]
        if not found:
            where = f"{base}/{'version_*' if version is None else folders[0].name}/checkpoints"
            explicit = any(isinstance(c, Namespace) and (c.get("init_args") or {}).get("dirpath")
                           for c in (cfg.trainer.get("callbacks") or []))
            if sub == "fit":
                print(f"cutmix-pl: no last.ckpt in {where}: starting a new run", file=sys.stderr)
            elif not explicit:
                raise ValueError(f"--ckpt_path last found no last.ckpt in {where}; fix: pass --ckpt_path PATH to "
                                 "a .ckpt file, or the logger name/save_dir of the run to load")
            return
        last = max(found, key=lambda p: (p.stat().st_mtime, str(p)))
        cfg.ckpt_path = str(last)
        if sub == "fit" and version is None:  # the run goes on in its own folder (logs, checkpoints)
            args.version = _version_value(last.parent.parent)
            print(f"cutmix-pl: resuming {last} (the run continues in {last.parent.parent})", file=sys.stderr)

    def _parse_ckpt_path(self) -> None:
        """Resolve ``last``, read the checkpoint once (a bad one ends here, in one line, before anything is
        written), refuse an architecture that contradicts the config, then let Lightning take the checkpoint's
        model hyperparameters as defaults."""
        self._checkpoint = None
        sub = self.config.get("subcommand")
        if sub:
            cfg = self.config[sub]
            self._resolve_ckpt_path(cfg, sub)
            self._checkpoint = self._read_checkpoint(cfg)
            if self._checkpoint is not None:
                self._check_architecture(cfg, sub, self._checkpoint)
        model = self.config[sub].get("model") if sub else None
        asked = {k: model.get(k) for k in RUN_OPTIONS} if isinstance(model, Namespace) else {}
        super()._parse_ckpt_path()
        # Lightning lets every saved hyperparameter override this run's config. How to run the network (TTA,
        # compile, memory format, image logging) is this run's choice, not the checkpoint's.
        for key, value in asked.items():
            self.config[sub].model[key] = value

    @staticmethod
    def _read_checkpoint(cfg: Namespace) -> dict[str, Any] | None:
        ckpt = cfg.get("ckpt_path")
        if not ckpt or ckpt in ("last", "best", "hpc") or "://" in str(ckpt) or not Path(ckpt).is_file():
            return None
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

    def _check_architecture(self, cfg: Namespace, sub: str, checkpoint: dict[str, Any]) -> None:
        """Lightning builds the model the checkpoint was saved from. Where the config names another depth, width
        or shortcut than its defaults, and so than the checkpoint's, that is a mistake to report, not to override."""
        saved = checkpoint.get("hyper_parameters") or {}
        model = cfg.get("model")
        if not isinstance(model, Namespace):
            return
        defaults = self._subcommand_parsers[sub].get_defaults().get("model") or Namespace()
        for key in ("depth", "width", "shortcut"):
            if key not in saved or model.get(key) == saved[key]:
                continue
            if model.get(key) != defaults.get(key):  # set by a --config or flag of this run
                raise ValueError(f"--ckpt_path {cfg.ckpt_path} holds a model with {key}={saved[key]!r} but the config "
                                 f"asks for {key}={model.get(key)!r}; fix: pass --model.{key} {saved[key]} (or leave "
                                 "it out: the checkpoint's is used), or leave out --ckpt_path to train from scratch")
            print(f"cutmix-pl: model.{key}={saved[key]!r} from the checkpoint", file=sys.stderr)

    def _check_checkpoint(self, subcommand: str) -> None:
        """The instantiated model against the checkpoint read above (num_classes comes from the data)."""
        checkpoint = getattr(self, "_checkpoint", None)
        if checkpoint is None:
            return
        self.model._check_compatible(checkpoint)
        logger = self.trainer.logger
        if (subcommand == "fit" and isinstance(logger, TensorBoardLogger) and logger._experiment is None
                and isinstance(getattr(logger, "_kwargs", None), dict) and Path(logger.log_dir).is_dir()):
            # Resuming into the run's own folder: TensorBoard hides the old events from the checkpoint's step on,
            # which the resumed run logs again, so the curves have no doubled stretch.
            logger._kwargs.setdefault("purge_step", int(checkpoint.get("global_step", 0)))

    def _check_not_overwriting(self, trainer: Any) -> None:
        """A fit writes checkpoints only into a folder of its own, or into the one it resumes from."""
        ckpt = self.config_init["fit"].get("ckpt_path")
        resumed_from = Path(ckpt).resolve().parent if ckpt and Path(ckpt).is_file() else None
        for cb in trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint):
                continue
            folder = Path(cb.dirpath) if cb.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
            if folder.is_dir() and any(folder.glob("*.ckpt")) and folder.resolve() != resumed_from:
                raise ValueError(f"{folder} already holds the checkpoints of an earlier run, which this run would "
                                 "overwrite; fix: leave out trainer.logger.init_args.version (each run gets a new "
                                 "version_N folder), or continue that run with --ckpt_path last")

    # -- the run: check the output folder first; after a failed start, remove what this run wrote ------------
    def _run_subcommand(self, subcommand: str) -> None:
        trainer = self.trainer
        folders = [Path(trainer.log_dir)] if trainer.log_dir else []
        folders += [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
                    if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        for folder in folders:
            why = _blocked(folder)
            if why is not None:
                raise ValueError(f"cannot write the run folder {folder}: {why}; fix: pass "
                                 "--trainer.logger.init_args.save_dir DIR with a writable folder")
        if subcommand == "fit":
            self._check_not_overwriting(trainer)
        self._check_checkpoint(subcommand)
        watch = folders[0].absolute() if folders and trainer.global_rank == 0 else None
        top = watch
        while top is not None and not top.parent.exists():  # the outermost folder this run would create
            top = top.parent
        before = set(watch.rglob("*")) if watch is not None and watch.exists() else None
        try:
            super()._run_subcommand(subcommand)
        except ValueError:
            if watch is not None:
                _remove_new_output(watch, top, before)
            raise


def _remove_new_output(watch: Path, top: Path, before: set[Path] | None) -> None:
    """After a run failed before saving any checkpoint, delete the files and folders it created."""
    if not watch.exists():
        return
    new = [p for p in watch.rglob("*") if before is None or p not in before]
    if any(p.suffix == ".ckpt" and p.is_file() for p in new):
        return  # it trained and saved: keep everything
    if before is None:  # the run folder is new: remove it, then the parents it needed, if left empty
        shutil.rmtree(watch, ignore_errors=True)
        parent = watch.parent
        while parent != top.parent and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
        return
    for p in sorted(new, key=lambda q: len(q.parts), reverse=True):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def main(args: list[str] | None = None) -> CutMixCLI | None:
    """Run the CLI. Errors in our own argument and data checks end in one line and exit status 2."""
    defaults = [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else []
    parser_kwargs: dict[str, Any] = {cmd: {"default_config_files": defaults, "exit_on_error": False}
                                     for cmd in SUBCOMMANDS}
    parser_kwargs["exit_on_error"] = False  # parse errors come back as ArgumentError: one line below, no usage dump
    # Our DataModule checkpoints its place in the epoch (and the augmentation stream), so a mid-epoch resume is exact.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    try:
        return CutMixCLI(
            ImageClassifier,
            CIFAR10DataModule,
            # Our loaders shard themselves (see data.ShardedBatchSampler), so Lightning must not re-wrap them.
            # StopOnSignal is added to every run, whatever trainer.callbacks a config sets.
            trainer_defaults={"use_distributed_sampler": False, "callbacks": [StopOnSignal()]},
            parser_kwargs=parser_kwargs,
            save_config_callback=SaveConfigNoOverwrite,
            auto_configure_optimizers=False,
            args=args,
        )
    except (ValueError, FloatingPointError, ArgumentError) as err:
        if os.environ.get("CUTMIX_PL_TRACEBACK"):
            raise
        print(f"cutmix-pl: error: {_concise(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as stop:
        print(f"cutmix-pl: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except SIGTERMException:
        print("cutmix-pl: stopped by SIGTERM; the last finished batch is in last.ckpt if training had started; "
              "resume: run the same command with --ckpt_path last", file=sys.stderr)
        raise SystemExit(128 + 15) from None


def run() -> None:
    """Entry point of the ``cutmix-pl`` command: ``main()`` without its return value, which a console script
    would hand to ``sys.exit`` (a non-None object there means exit status 1)."""
    main()


def _concise(err: BaseException, cfg: Namespace | None = None) -> str:
    """One line for an error: jsonargparse's Union report cut down to our own message, parse errors with a fix."""
    text = str(err)
    if "Does not validate against any of the Union subtypes" in text:
        causes = [ln.strip()[2:] for ln in text.splitlines() if ln.strip().startswith("- ")
                  and "Expected a <class 'NoneType'>" not in ln]
        cls = re.search(r"class_path='([^']+)'", text)
        keys = [k[: -len(".class_path")] for k, v in (cfg.items() if cfg is not None else [])
                if cls and k.endswith(".class_path") and v == cls.group(1)]
        if causes and len(keys) == 1:  # "alpha=0.0 is out of range" -> "data.mixer.init_args.alpha=0.0 is ..."
            causes = [f"{keys[0]}.init_args.{c}" if re.match(r"\w+=", c) else f"{keys[0]}: {c}" for c in causes]
            text = "; ".join(causes) + f"; fix: change {keys[0]}.init_args"
        elif causes:
            text = f"{cls.group(1) + ': ' if cls else ''}{'; '.join(causes)}"
    text = " ".join(text.split())
    if isinstance(err, ArgumentError):
        if not text.startswith("Problem with given class_path") and "fix:" not in text:
            text += "; fix: check the key and its value (python -m cutmix_pl fit --help lists every key and type)"
    return text

"""``python -m cutmix_pl {fit,validate,test,predict}``: the Lightning CLI over the model and the DataModule.

With no ``--config``, ``configs/cutmix.yaml`` (the default recipe) is loaded; each further ``--config`` is
applied on top of it, then command-line flags. Where a run lives, which checkpoint ``--ckpt_path`` means and what a
resume may change are the rules of ``runs.py``; this file applies them to the parsed config, through LightningCLI's
public hooks only.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from . import hardware, runs
from .run_plan import RunPlan, blocked, plain
from .callbacks import (Interrupted, LastCheckpoint, PredictionWriter, StopOnSignal, StoppedEarly,
                        stop_early_on_signals)
from .checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from .data import CIFAR10DataModule
from .module import ImageClassifier
from .nets import net_differences
from .upgrade import is_old

# The recipes ship inside the package (a plain or wheel install has them); the top-level configs/ links here.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
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


# Model arguments that say how to run the network, not what it is: taken from this run's config even when a
# checkpoint is loaded (its other hyperparameters win, as Lightning does).
RUN_OPTIONS = ("tta_flip", "compile", "channels_last", "log_images", "grid_size")
LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
# DataModule arguments that say which training images were held out for validation: an evaluation takes the run's.
SPLIT_KEYS = ("val_size", "split_seed")


class CutMixCLI(LightningCLI):
    """LightningCLI plus the run rules of ``runs.py``, applied to the config between parsing and instantiation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.plan = RunPlan()
        self._asked: dict[str, Any] = {}
        try:
            super().__init__(*args, **kwargs)
        except Exception:
            self.plan.failed()
            raise
        finally:
            self.plan.release()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")

    # -- between parsing and instantiation: the config says exactly what will run ------------------------------
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if sub:
            cfg = self.config[sub]
            self._settle_defaults(cfg)
            if sub != "fit" and cfg.get("ckpt_path") is None:
                raise ValueError(f"{sub} needs --ckpt_path: without one it would evaluate an untrained network; fix: "
                                 "pass a run folder (runs/<name>/version_N), a .ckpt file, or last (the newest "
                                 "run's last.ckpt)")
            self.plan.read(sub, cfg)
            resumed = self._resumed_config(sub, cfg)
            self._choose_for_machine(cfg, resumed)
            self._asked = {k: cfg.model.get(k) for k in RUN_OPTIONS} if isinstance(cfg.get("model"), Namespace) else {}
            self._check_architecture(cfg)  # before a resume's settings check: the more specific message
            self._check_model_settings(sub, cfg, resumed)
            self._split_from_checkpoint(sub, cfg)
            self.plan.place(sub, cfg)

    @staticmethod
    def _settle_defaults(cfg: Namespace) -> None:
        """Choices made for the user, made here so that config.yaml records them (and a resume compares them)."""
        trainer = cfg.trainer
        max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
        if max_epochs is not None and max_epochs < 1 and (max_steps is None or max_steps < 1):
            raise ValueError(f"trainer.max_epochs={max_epochs} is out of range: the learning-rate schedules need an "
                             "end; fix: a value >= 1 (or a trainer.max_steps >= 1)")
        for name in LIMITS:
            if trainer.get(name) == 1:
                # Lightning reads a float as a fraction, and the CLI parses Trainer's int-or-float limits as floats
                _note(f"trainer.{name}=1 reads as 1.0, all batches (a float is a fraction of them); for a few batches "
                      "pass 2 or more")
        for cb in trainer.get("callbacks") or []:
            if isinstance(cb, Namespace) and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
                # one last.ckpt per run, overwritten (atomically) by every save, never last-v1.ckpt beside a stale one
                cb.init_args.enable_version_counter = False

    def _resumed_config(self, sub: str, cfg: Namespace) -> dict[str, Any]:
        """The saved config of the run that this ``fit`` resumes (empty when it starts a new run)."""
        ckpt = cfg.get("ckpt_path")
        if sub != "fit" or self.plan.checkpoint is None or ckpt is None:
            return {}
        return runs.saved_config(runs.run_of_checkpoint(ckpt)) or {}

    @staticmethod
    def _choose_for_machine(cfg: Namespace, resumed: dict[str, Any]) -> None:
        """Precision and memory format left null: the fastest measured safe here (``hardware.py``), printed and
        recorded in config.yaml. A resumed run keeps what it ran with, so that it continues as it would have."""
        trainer = cfg.trainer
        model = cfg.model if isinstance(cfg.get("model"), Namespace) else Namespace()
        if trainer.precision is None:
            trainer.precision = (resumed.get("trainer") or {}).get("precision")
        if model.get("channels_last", False) is None:  # a model without the option is left alone
            model.channels_last = (resumed.get("model") or {}).get("channels_last")
        if trainer.precision is None or model.get("channels_last", False) is None:
            choice, chosen = hardware.choose(trainer.accelerator), []
            hint = choice.hint if trainer.precision is None else ""  # the hint is about precision
            if trainer.precision is None:
                trainer.precision = choice.precision
                chosen.append(f"trainer.precision={choice.precision}")
            if model.get("channels_last", False) is None:
                model.channels_last = choice.channels_last
                chosen.append(f"model.channels_last={str(choice.channels_last).lower()}")
            _note(f"{', '.join(chosen)} (the fastest measured safe on {choice.why}; set them to override)"
                  + (f"; {hint}" if hint else ""))

    def _check_architecture(self, cfg: Namespace) -> None:
        """Lightning builds the network the checkpoint was saved with. Where this run's config names another
        ``model.net`` than the recipe's, and so than the checkpoint's, that is a mistake to report, not to override."""
        if self.plan.checkpoint is not None and is_old(self.plan.checkpoint):
            raise ValueError(f"--ckpt_path {cfg.ckpt_path} was written before the network became model.net (it records "
                             f"model.depth/width/shortcut); fix: python -m cutmix_pl.upgrade {cfg.ckpt_path} NEW.ckpt, "
                             "then pass --ckpt_path NEW.ckpt")
        saved = ((self.plan.checkpoint or {}).get("hyper_parameters") or {}).get("net")
        net = cfg.model.get("net") if isinstance(cfg.get("model"), Namespace) else None
        if not isinstance(saved, dict) or not isinstance(net, Namespace):
            return
        asked = net.as_dict()
        diffs = net_differences(saved, asked)
        if diffs and net_differences(_recipe_net(), asked):  # set by a --config or flag of this run
            key, old, new = diffs[0]
            flag = f"--model.net {old}" if key == "class_path" else f"--model.net.{key} {old}"
            raise ValueError(f"--ckpt_path {cfg.ckpt_path} holds a model with {key}={old!r} but the config asks for "
                             f"{key}={new!r}; fix: pass {flag} (or leave it out: the checkpoint's is used), or leave "
                             "out --ckpt_path to train from scratch")
        for key, old, _ in diffs:
            _note(f"model.net {key}={old!r} from the checkpoint")

    def _check_model_settings(self, sub: str, cfg: Namespace, resumed: dict[str, Any]) -> None:
        """``fit --ckpt_path`` of a checkpoint outside a run folder (no config.yaml beside it to compare the command
        with, as a resume into its run does): Lightning trains with the model settings the checkpoint records, so
        one that this command sets otherwise (by a --config or flag: it differs from the recipe) is refused in one
        line rather than ignored; the others are taken from the checkpoint, and said so."""
        if sub != "fit" or self.plan.checkpoint is None or not isinstance(cfg.get("model"), Namespace):
            return
        if resumed:
            return  # a resume into its run (its saved config): runs.changed_settings compares the whole config
        saved = runs.flatten(self.plan.checkpoint.get("hyper_parameters") or {})
        asked = runs.flatten(plain(cfg.model))
        recipe = runs.flatten(_recipe().get("model") or {})
        differ = [k for k in sorted(set(saved) & set(asked)) if not runs.same_value(saved[k], asked[k])
                  and not k.startswith(("net.", "_")) and k.split(".")[0] not in (*RUN_OPTIONS, "num_classes")]
        refused = [k for k in differ if k in recipe and not runs.same_value(recipe[k], asked[k])]
        if refused:
            text = ", ".join(f"model.{k} ({saved[k]!r} there, {asked[k]!r} asked)" for k in refused)
            raise ValueError(f"--ckpt_path {cfg.ckpt_path} continues with the model settings it was trained with, "
                             f"but this command asks for others: {text}; fix: leave them out, or leave out "
                             "--ckpt_path to start a new run with them")
        for key in differ:
            _note(f"model.{key}={saved[key]!r} from the checkpoint")

    def _split_from_checkpoint(self, sub: str, cfg: Namespace) -> None:
        """``validate`` of a checkpoint validates on its run's held-out images: the split (``data.val_size``,
        ``data.split_seed``) comes from the checkpoint, as the network does; another split would hold images the
        run trained on (a short.yaml run, val_size 0, trained on all 50,000). test and predict use the test set."""
        data = cfg.get("data")
        if sub != "validate" or self.plan.checkpoint is None or not isinstance(data, Namespace):
            return
        saved = self.plan.checkpoint.get("datamodule_hyper_parameters") or {}
        for key in SPLIT_KEYS:
            if key in saved and key in data and saved[key] != data[key]:
                _note(f"data.{key}={saved[key]!r} from the checkpoint, not {data[key]!r}: the run's validation split "
                      "(another would hold images it trained on)")
                data[key] = saved[key]

    def before_instantiate_classes(self) -> None:
        # Lightning let the checkpoint's hyperparameters override the config. How to run the network (TTA, compile,
        # memory format, image logging) is this command's choice, not the checkpoint's.
        if self.subcommand and isinstance(self.config[self.subcommand].get("model"), Namespace):
            for key, value in self._asked.items():
                self.config[self.subcommand].model[key] = value

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # name the config key of a failing class (data.mixer...), not just the class
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            raise ValueError(_concise(err, cfg)) from None

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Checkpoints are written atomically (checkpoint_io.py) unless the config brings its own CheckpointIO."""
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        plugins = cfg.trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        if self.plan.checkpoint is not None:  # num_classes comes from the data, so only the built model can tell
            self.model.check_compatible(self.plan.checkpoint, where=self.config[self.subcommand].ckpt_path)

    # -- around the subcommands (LightningCLI's public before_/after_ hooks) --------------------------------------
    def before_fit(self) -> None:
        """Checkpoints of another run in an explicit ModelCheckpoint dirpath would be overwritten: refuse."""
        own = self.plan.run.absolute() if self.plan.run is not None else None
        if own is not None:
            (own / runs.FINISHED).unlink(missing_ok=True)  # training again (a resume that extends the run)
        for cb in self.trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint) or not cb.dirpath:
                continue
            folder = Path(cb.dirpath).absolute()
            why = blocked(folder)
            if why is not None:
                raise ValueError(f"cannot write the checkpoint folder {folder}: {why}; fix: pass a writable dirpath")
            if folder.is_dir() and any(folder.glob("*.ckpt")) and (own is None or own not in folder.parents):
                raise ValueError(f"{folder} already holds the checkpoints of an earlier run, which this run would "
                                 "overwrite; fix: give this ModelCheckpoint another dirpath, or continue that run with "
                                 "--ckpt_path last")

    def before_validate(self) -> None:
        self._check_eval_folder()

    def before_test(self) -> None:
        self._check_eval_folder()

    def before_predict(self) -> None:
        self._check_eval_folder()

    def _check_eval_folder(self) -> None:
        folder = Path(self.trainer.log_dir) if self.trainer.log_dir else None
        why = blocked(folder) if folder is not None else None
        if why is not None:
            raise ValueError(f"cannot write the evaluation folder {folder}: {why}; fix: copy the checkpoint into a "
                             "writable folder and pass that path to --ckpt_path")

    def after_fit(self) -> None:
        run = self.plan.run
        if run is None or not self.trainer.is_global_zero or not self.trainer.state.finished:
            return
        runs.mark_finished(run)
        print(f"cutmix-pl: run {run}\n  checkpoints: {run / 'checkpoints'} (last.ckpt: the final state)\n"
              f"  TensorBoard: tensorboard --logdir {run.parent}", file=sys.stderr)


def _note(text: str) -> None:
    """A line about this command's settings, once: DDP-launched ranks parse the same command again."""
    if rank_zero_only.rank == 0:
        print(f"cutmix-pl: {text}", file=sys.stderr)


def _recipe() -> dict[str, Any]:
    """The default recipe, configs/cutmix.yaml, as a dict."""
    return (yaml.safe_load(DEFAULT_CONFIG.read_text()) if DEFAULT_CONFIG.is_file() else None) or {}


def _recipe_net() -> dict[str, Any]:
    """``model.net`` as the default recipe has it."""
    return (_recipe().get("model") or {}).get("net") or {"class_path": "cutmix_pl.resnet.ResNet"}


def _check_yaml_files(args: list[str]) -> None:
    """A config file that is not valid YAML: one line naming the file and the place (jsonargparse names neither)."""
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else arg.partition("=")[2] if arg.startswith(
            "--config=") else None
        if not path or not Path(path).is_file():
            continue
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{path} is not valid YAML ({where}{problem}); fix: correct the file (keys as in "
                             "configs/cutmix.yaml)") from None


def main(args: list[str] | None = None) -> CutMixCLI | None:
    """Run the CLI. Errors in our own argument and data checks end in one line and exit status 2."""
    defaults = [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else []
    # exit_on_error off: parse errors come back as ArgumentError, one line below, no usage dump; allow_abbrev off: a
    # misspelt key that happens to be a prefix of one (--trainer.max_epoch) is an error, not a guess
    strict = {"exit_on_error": False, "allow_abbrev": False}
    parser_kwargs: dict[str, Any] = {cmd: {"default_config_files": defaults, **strict} for cmd in SUBCOMMANDS}
    parser_kwargs.update(strict)
    # `python -m cutmix_pl --help` would say "usage: __main__.py"
    parser_kwargs["prog"] = "python -m cutmix_pl" if Path(sys.argv[0]).name == "__main__.py" else None
    # Our DataModule checkpoints its place in the epoch (and the augmentation stream), so a mid-epoch resume is exact.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    _quiet()
    try:
        _check_yaml_files(list(args) if args is not None else sys.argv[1:])
        with stop_early_on_signals():
            return _cli(args, parser_kwargs)
    except (ValueError, FloatingPointError, ArgumentError) as err:
        if os.environ.get("CUTMIX_PL_TRACEBACK"):
            raise
        print(f"cutmix-pl: error: {_concise(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except MisconfigurationException as err:  # Lightning's own checks: no GPU for accelerator gpu, ...
        if os.environ.get("CUTMIX_PL_TRACEBACK"):
            raise
        print(f"cutmix-pl: error: {' '.join(str(err).split())}; fix: check the trainer settings (e.g. "
              "--trainer.accelerator auto uses a GPU when there is one, else the CPU)", file=sys.stderr)
        raise SystemExit(2) from None
    except CheckpointWriteError as err:
        print(f"cutmix-pl: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except (Interrupted, StoppedEarly) as stop:
        print(f"cutmix-pl: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except SIGTERMException:
        print("cutmix-pl: stopped by SIGTERM; the last finished batch is in last.ckpt if training had started; "
              "resume: run the same command with --ckpt_path last", file=sys.stderr)
        raise SystemExit(128 + 15) from None


def _cli(args: list[str] | None, parser_kwargs: dict[str, Any]) -> CutMixCLI:
    return CutMixCLI(
        ImageClassifier,
        CIFAR10DataModule,
        # Our loaders shard themselves (see data.ShardedBatchSampler), so Lightning must not re-wrap them.
        # Added to every run, whatever trainer.callbacks a config sets (after the config's ModelCheckpoint, so
        # that last.ckpt records its best model, and StopOnSignal after both).
        trainer_defaults={"use_distributed_sampler": False,
                          "callbacks": [LastCheckpoint(), StopOnSignal(), PredictionWriter()]},
        parser_kwargs=parser_kwargs,
        save_config_callback=SaveConfigNoOverwrite,
        auto_configure_optimizers=False,
        args=args,
    )


def _quiet() -> None:
    """Drop the output that says nothing about this run: Lightning's advert for its cloud logger, and a deprecation
    warning that Lightning's own code triggers under newer torch (not ours to fix)."""
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdvert) for f in logger.filters):
            logger.addFilter(_NoAdvert())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # validate/test/predict write into <run>/<command>/, so a checkpoint callback's folder differs from the fit's;
    # its best-model record matters only to training
    warnings.filterwarnings("ignore", message="The dirpath has changed from")
    # the summary counts parameters at 32 bits under bf16 autocast, which is right: autocast keeps fp32 weights
    warnings.filterwarnings("ignore", message="Precision bf16-mixed is not supported by the model summary")
    # per-class accuracy and hp_metric are computed from values already reduced over the ranks
    warnings.filterwarnings("ignore", message=r".*self\.log\('(val_class/|hp_metric)")


class _NoAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


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

"""``python -m cutmix_pl {fit,validate,test,predict}``: the Lightning CLI over the model and the DataModule.

With no ``--config``, ``configs/cutmix.yaml`` (the default recipe) is loaded; each further ``--config`` is
applied on top of it, then command-line flags. Where a run lives, which checkpoint ``--ckpt_path`` means and what a
resume may change are the rules of ``runs.py``; ``run_plan.py`` applies them to the parsed config, through LightningCLI's
public hooks only.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, DefaultHelpFormatter, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import LastCheckpoint, PredictionWriter, ResumedEpochBar, SaveConfigNoOverwrite
from .checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from .data import CIFAR10DataModule
from .module import ImageClassifier
from .run_plan import RunPlan, blocked, shown
from .settings import CONFIG_DIR, DEFAULT_CONFIG, NOTES
from .signals import Interrupted, StopOnSignal, StoppedEarly, stop_early_on_signals

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class CutMixCLI(LightningCLI):
    """LightningCLI plus the run rules of ``run_plan.py``, applied to the config between parsing and instantiation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.plan = RunPlan()
        try:
            super().__init__(*args, **kwargs)
        except (Exception, StoppedEarly) as err:
            kept = self.plan.failed()
            if isinstance(err, CheckpointWriteError) and not kept:  # the run it had claimed is gone: nothing to resume
                raise CheckpointWriteError(str(err).replace("then resume with --ckpt_path last", "then run the "
                                                            "command again (no state had been saved)")) from None
            raise
        finally:
            self.plan.release()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Between parsing and instantiation: the run plan settles what will run; the checkpoint's model settings
        are applied here, checked (LightningCLI's own reading of them loads every checkpoint weights-only and would
        import any network class the file names), so it is given no checkpoint path until instantiation."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub:
            return
        taken = self.plan.prepare(sub, self.config[sub])
        if taken:
            try:
                self.config = parser.parse_object({sub: {"model": taken}}, self.config)
            except ArgumentError as err:
                raise ValueError(f"--ckpt_path {self.config[sub].ckpt_path} records model settings this version "
                                 f"cannot take ({_concise(err)}); fix: pass a .ckpt file written by this "
                                 "project") from None
        self.plan.ckpt_path, self.config[sub].ckpt_path = self.config[sub].ckpt_path, None

    def before_instantiate_classes(self) -> None:
        if self.subcommand:
            self.config[self.subcommand].ckpt_path = self.plan.ckpt_path

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
        # last.ckpt before the config's checkpoints (the resume point first), its follow-up after them
        own = cfg.trainer.get("callbacks") or []
        last = LastCheckpoint()
        kwargs.setdefault("callbacks", [last, *(own if isinstance(own, (list, tuple)) else [own]), last.follow_up])
        try:
            return super().instantiate_trainer(**kwargs)
        except RuntimeError as err:  # Lightning's own checks of the settings (two ModelCheckpoints it cannot tell
            if f"{os.sep}lightning{os.sep}" not in traceback.extract_tb(err.__traceback__)[-1].filename:  # apart...)
                raise  # not a setting Lightning refused (a driver, the environment): the traceback helps
            raise ValueError(f"{' '.join(str(err).split())}; fix: check the trainer settings ({self.subcommand} "
                             "--help lists them)") from err

    def after_instantiate_classes(self) -> None:
        if self.plan.checkpoint is not None:  # num_classes comes from the data, so only the built model can tell
            self.model.check_compatible(self.plan.checkpoint, where=self.plan.ckpt_path)

    def before_fit(self) -> None:
        self._refuse_overwrites()  # on every rank: torchrun and SLURM start them together, and each must stop
        self._start()

    def _refuse_overwrites(self) -> None:
        """Checkpoints of another run in an explicit ModelCheckpoint dirpath would be overwritten: refuse."""
        own = self.plan.run
        for cb in self.trainer.checkpoint_callbacks:
            if not (isinstance(cb, ModelCheckpoint) and cb.dirpath):
                continue
            folder = Path(cb.dirpath).absolute()
            why = blocked(folder)
            if why is not None:
                raise ValueError(f"cannot write the checkpoint folder {folder}: {why}; fix: pass a writable dirpath")
            ours = folder in self.plan.resumed_dirs or (own is not None and own in folder.parents)
            if any(folder.glob("*.ckpt")) and not ours:
                raise ValueError(f"{folder} already holds the checkpoints of an earlier run, which this run would "
                                 "overwrite; fix: give this ModelCheckpoint another dirpath, or continue that run with "
                                 "--ckpt_path last")

    def _start(self) -> None:
        """The command starts: the lines about its settings, its seed and its devices, held until then, are
        printed."""
        for held in _HELD:
            held.release()

    before_validate = before_test = before_predict = _start

    def after_fit(self) -> None:
        run = self.plan.run
        if run is not None and self.trainer.is_global_zero and self.trainer.state.finished:
            print(f"cutmix-pl: run {shown(run)}\n  checkpoints: {shown(run / 'checkpoints')} (last.ckpt: the final "
                  f"state)\n  TensorBoard: tensorboard --logdir {shown(run.parent)}", file=sys.stderr)

    def after_validate(self) -> None:
        if self.plan.run is not None and self.trainer.is_global_zero:
            print(f"cutmix-pl: {self.subcommand} wrote {shown(self.plan.run)} (TensorBoard: tensorboard --logdir "
                  f"{shown(self.plan.run.parent.parent)})", file=sys.stderr)

    after_test = after_predict = after_validate


class HelpFormatter(DefaultHelpFormatter):
    """``--help`` lists every imported subclass of a key's type; for model.net (any ``nn.Module``) that is some 750
    torch classes, half the page (Lightning issue 20591). A long list shows this project's classes, a few others and
    how many more there are."""

    LONGEST = 40

    def _get_help_string(self, action: Any) -> str:
        text = super()._get_help_string(action)
        head, sep, listed = text.partition(", known subclasses: ")
        names = listed[:-1].split(", ") if sep and listed.endswith(")") else []
        if len(names) <= self.LONGEST:
            return text
        ours = [n for n in names if n.startswith(f"{__package__}.")]
        others = [n for n in names if n not in ours][:4]
        more = len(names) - len(ours) - len(others)
        return f"{head}{sep}{', '.join(ours + others)} and {more} more: any importable class of the type)"


def _config_args(args: list[str]) -> list[str]:
    """``--config NAME`` of a packaged recipe (a bare name, no such file here) as its path; then each config file
    checked to be YAML: one line naming the file and the place (jsonargparse names neither)."""
    args = list(args)
    for i, arg in enumerate(args):
        at = i + 1 if arg == "--config" and i + 1 < len(args) else i if arg.startswith("--config=") else None
        path = None if at is None else args[at].partition("=")[2] if at == i else args[at]
        if not path:
            continue
        if re.fullmatch(r"[\w.-]+", path) and not Path(path).exists():
            recipe = CONFIG_DIR / (path if path.endswith(".yaml") else f"{path}.yaml")
            if not recipe.is_file():
                names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
                raise ValueError(f"--config {path}: no such file, and no packaged recipe of that name ({names}); "
                                 "fix: pass the path of a YAML file, or one of those names")
            path = str(recipe)
            args[at] = f"--config={path}" if at == i else path
        if not Path(path).is_file():
            continue
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{path} is not valid YAML ({where}{problem}); fix: correct the file (keys as in "
                             "configs/cutmix.yaml)") from None
    return args


def main(args: list[str] | None = None) -> CutMixCLI | None:
    """Run the CLI. Errors in our own argument and data checks end in one line and exit status 2."""
    defaults = [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else []
    # exit_on_error off: parse errors come back as ArgumentError, one line below, no usage dump; allow_abbrev off: a
    # misspelt key that happens to be a prefix of one (--trainer.max_epoch) is an error, not a guess
    strict = {"exit_on_error": False, "allow_abbrev": False}
    strict["formatter_class"] = HelpFormatter
    parser_kwargs: dict[str, Any] = {cmd: {"default_config_files": defaults, **strict} for cmd in SUBCOMMANDS}
    parser_kwargs.update(strict)
    # `python -m cutmix_pl --help` would say "usage: __main__.py"
    parser_kwargs["prog"] = "python -m cutmix_pl" if Path(sys.argv[0]).name == "__main__.py" else None
    # Our DataModule checkpoints its place in the epoch (and the augmentation stream), so a mid-epoch resume is exact.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    _quiet()
    for held in _HELD:  # until the command starts (CutMixCLI._start)
        held.held = []
    try:
        if args is None:  # LightningCLI warns when given args while sys.argv holds some: rewrite sys.argv instead
            sys.argv[1:] = _config_args(sys.argv[1:])
        else:
            args = _config_args(args)
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
    finally:  # what a command refused at start held back is not printed after its error
        for held in _HELD:
            held.held = None


def _cli(args: list[str] | None, parser_kwargs: dict[str, Any]) -> CutMixCLI:
    return CutMixCLI(
        ImageClassifier,
        CIFAR10DataModule,
        # Our loaders shard themselves (see data.ShardedBatchSampler), so Lightning must not re-wrap them.
        # Added to every run, whatever trainer.callbacks a config sets (StopOnSignal after its checkpoints;
        # LastCheckpoint: instantiate_trainer).
        trainer_defaults={"use_distributed_sampler": False,
                          "callbacks": [StopOnSignal(), PredictionWriter(), ResumedEpochBar()]},
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


class _HeldRecords(logging.Filter):
    """Holds a logger's records while ``held`` is a list (Lightning's "Seed set to N" and device lines, logged while
    the classes are built and checked), then hands them on."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.logger, self.held = logging.getLogger(name), None
        self.logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.held is None:
            return True
        self.held.append(record)
        return False

    def release(self) -> None:
        held, self.held = self.held or [], None
        for record in held:
            self.logger.handle(record)


# What a command prints before it starts: our notes about its settings, then Lightning's seed and device lines.
_HELD = [NOTES, *(_HeldRecords(name) for name in ("lightning.fabric.utilities.seed",
                                                  "lightning.fabric.utilities.rank_zero",
                                                  "lightning.pytorch.utilities.rank_zero"))]


class _NoAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def run() -> None:
    """What ``python -m cutmix_pl`` and ``cutmix-pl`` run once imported (``__main__.py``): ``main()`` without its
    return value, which a console script would hand to ``sys.exit`` (a non-None object there means exit status 1)."""
    main()


def _concise(err: BaseException, cfg: Namespace | None = None) -> str:
    """One line for an error: jsonargparse's Union report cut down to our own message, parse errors with a fix."""
    text = str(err)
    if "Does not validate against any of the Union subtypes" in text:
        errors = text.partition("Errors:")[2].partition("Given value type:")[0]
        causes = [" ".join(c.split()) for c in re.split(r"\n\s*- ", errors) if c.strip()
                  and "Expected a <class 'NoneType'>" not in c]
        # a value of the wrong type: 'Problem with given class_path ...: Parser key "alpha": Expected ...' -> 'alpha ...'
        causes = [re.sub(r"^Problem with given class_path '[^']+': Parser key \"(\w+)\": ", r"\1: ", c) for c in causes]
        cls = re.search(r"class_path[= ]'([^']+)'", text)
        keys = [k[: -len(".class_path")] for k, v in (cfg.items() if cfg is not None else [])
                if cls and k.endswith(".class_path") and v == cls.group(1)]
        outer = re.match(r'Parser key "([\w.]+)":', text)  # a parse error names the key of the class
        keys = keys or ([outer.group(1)] if outer and cls else [])
        if causes and len(keys) == 1:  # "alpha=0.0 is out of range" -> "data.mixer.init_args.alpha=0.0 is ..."
            causes = [f"{keys[0]}.init_args.{c}" if re.match(r"\w+[=:]", c) else f"{keys[0]}: {c}" for c in causes]
            text = "; ".join(causes) + f"; fix: change {keys[0]}.init_args"
        elif causes:
            text = f"{cls.group(1) + ': ' if cls else ''}{'; '.join(causes)}"
    text = " ".join(text.split())
    if isinstance(err, ArgumentError):
        if not text.startswith("Problem with given class_path") and "fix:" not in text:
            text += "; fix: check the key and its value (python -m cutmix_pl fit --help lists every key and type)"
    return text

"""``python -m cutmix_pl {fit,validate,test,predict}``: the Lightning CLI over the model and the DataModule.

With no ``--config``, ``configs/cutmix.yaml`` (the default recipe) is loaded; each further ``--config`` (a file, or
the name of a packaged recipe) applies on top of it, then command-line flags. Where a run lives and what a command may
do there is the run machinery's (``runs/``), which this CLI calls through one door, :class:`runs.Command`.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .data import CIFAR10DataModule
from .files import WriteError
from .module import ImageClassifier
from .predictions import PredictionWriter
from .runs import Command, console
from .runs.callbacks import ResumedEpochBar, SaveConfigNoOverwrite
from .runs.recipes import CONFIG_DIR, DEFAULT_CONFIG, config_args, kept_on_class_change
from .runs.stop import Interrupted, StopOnSignal, StoppedEarly, stop_early_on_signals

__all__ = ["CONFIG_DIR", "CutMixCLI", "main"]
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# the connection between DDP processes (not a backend's error, whose traceback helps); () without torch.distributed
DIST_ERRORS = tuple(getattr(torch.distributed, name) for name in ("DistNetworkError", "DistStoreError")
                    if hasattr(torch.distributed, name))


class CutMixCLI(LightningCLI):
    """LightningCLI with the run machinery applied between parsing and instantiation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.command, failure, self.parsers = Command(), None, []
        try:
            super().__init__(*args, **kwargs)
        except (Exception, StoppedEarly, Interrupted) as err:  # a stop that saved a last.ckpt keeps the run
            failure = err
            raise
        finally:
            replaced = self.command.cleanup(failure)
            if replaced is not None:
                raise replaced from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self.parsers.append(parser)  # each subcommand's: the keys a misspelt one may have meant
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """The command prepared; the checkpoint's model settings applied here, checked (LightningCLI's own reading of
        them would load every checkpoint and import any network class it names), so Lightning gets the checkpoint's
        path only at instantiation."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ArgumentError(None, f"{err}{self.did_you_mean(str(err))}") from None
        sub = self.config.get("subcommand")
        if not sub:
            return
        kept = kept_on_class_change(list(args if isinstance(args, list) else sys.argv[1:]), self.config[sub].data.mixer)
        if kept:
            console.NOTES.note(kept)
        taken = self.command.prepare(sub, self.config[sub])
        if taken:
            try:
                self.config = parser.parse_object({sub: {"model": taken}}, self.config)
            except ArgumentError as err:
                raise ValueError(f"--ckpt_path {self.config[sub].ckpt_path} records model settings this version "
                                 f"cannot take ({console.concise(err)}); fix: pass a .ckpt file written by this "
                                 "project") from None
        self.command.ckpt_path, self.config[sub].ckpt_path = self.config[sub].ckpt_path, None

    def did_you_mean(self, error: str) -> str:
        """``; fix: did you mean --KEY?`` for the key, given as a flag or in a config file, that is not one."""
        bad = re.search(r"unrecognized arguments: --([\w.]+)|does not accept option '([\w.]+)'", error)
        keys = {key for p in self.parsers for key in p.get_defaults().keys()} if bad else set()
        close = difflib.get_close_matches(bad.group(1) or bad.group(2), keys, n=1, cutoff=0.75) if keys else []
        return f"; fix: did you mean --{close[0]}? (--help lists every key)" if close else ""

    def before_instantiate_classes(self) -> None:
        if self.subcommand:
            self.config[self.subcommand].ckpt_path = self.command.ckpt_path

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # name the config key of a failing class (data.mixer...), not just the class
            raise ValueError(console.concise(err, self.config[self.subcommand] if self.subcommand else self.config))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        try:
            return super().instantiate_trainer(**self.command.trainer_kwargs(cfg.trainer, kwargs))
        except RuntimeError as err:  # Lightning's own checks of the settings (two ModelCheckpoints it cannot tell
            if f"{os.sep}lightning{os.sep}" not in traceback.extract_tb(err.__traceback__)[-1].filename:  # apart...)
                raise  # not a setting Lightning refused (a driver, the environment): the traceback helps
            raise ValueError(f"{' '.join(str(err).split())}; fix: check the trainer settings ({self.subcommand} "
                             "--help lists them)") from err

    def after_instantiate_classes(self) -> None:
        if self.command.checkpoint is not None:  # num_classes comes from the data: only the built model can tell
            self.model.check_compatible(self.command.checkpoint, where=self.command.ckpt_path)

    def before_fit(self) -> None:
        self.command.check_checkpoint_dirs(self.trainer)
        console.start()

    def before_validate(self) -> None:
        console.start()

    before_test = before_predict = before_validate

    def after_fit(self) -> None:
        self.command.report(self.subcommand, self.trainer)

    after_validate = after_test = after_predict = after_fit


def main(args: list[str] | None = None) -> CutMixCLI | None:
    """Run the CLI. Errors in our own argument and data checks end in one line and exit status 2."""
    # exit_on_error off: parse errors come back as ArgumentError, one line below, no usage dump; allow_abbrev off: a
    # misspelt key that happens to be a prefix of one (--trainer.max_epoch) is an error, not a guess
    strict = {"exit_on_error": False, "allow_abbrev": False, "formatter_class": console.HelpFormatter}
    defaults = [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else []
    parser_kwargs: dict[str, Any] = {cmd: {"default_config_files": defaults, **strict} for cmd in SUBCOMMANDS}
    # `python -m cutmix_pl --help` would say "usage: __main__.py"
    parser_kwargs.update(strict, prog="python -m cutmix_pl" if Path(sys.argv[0]).name == "__main__.py" else None)
    console.quiet()
    console.hold(True)  # until the command starts
    try:
        if args is None:  # LightningCLI warns when given args while sys.argv holds some: rewrite sys.argv instead
            sys.argv[1:] = config_args(sys.argv[1:])
        else:
            args = config_args(args)
        with stop_early_on_signals():
            return CutMixCLI(
                ImageClassifier, CIFAR10DataModule,
                # Our loaders shard themselves (data.ShardedBatchSampler): Lightning must not re-wrap them. Added to
                # every run, whatever trainer.callbacks a config sets (last.ckpt: Command.trainer_kwargs).
                trainer_defaults={"use_distributed_sampler": False,
                                  "callbacks": [StopOnSignal(), PredictionWriter(), ResumedEpochBar()]},
                parser_kwargs=parser_kwargs, save_config_callback=SaveConfigNoOverwrite,
                auto_configure_optimizers=False, args=args)
    except (ValueError, FloatingPointError, ArgumentError, MisconfigurationException) as err:
        if os.environ.get("CUTMIX_PL_TRACEBACK"):
            raise
        text = console.concise(err)
        if isinstance(err, MisconfigurationException):  # Lightning's own checks: no GPU for accelerator gpu, ...
            text += ("; fix: check the trainer settings (e.g. --trainer.accelerator auto uses a GPU when there is one, "
                     "else the CPU)")
        print(f"cutmix-pl: error: {text}", file=sys.stderr)
        raise SystemExit(2) from None
    except WriteError as err:
        print(f"cutmix-pl: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except (Interrupted, StoppedEarly) as stop:
        print(f"cutmix-pl: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except DIST_ERRORS as err:  # e.g. another DDP process stopped while this one waited on it (no traceback)
        print(f"cutmix-pl: error: the DDP processes could not connect or lost each other ({type(err).__name__}: "
              f"{' '.join(str(err).split())[:200]}); fix: if another process stopped or failed first, its own line "
              "says why; else check MASTER_ADDR and MASTER_PORT (docs/distributed.md)", file=sys.stderr)
        raise SystemExit(1) from None
    except SIGTERMException:
        print("cutmix-pl: stopped by SIGTERM; the last finished batch is in last.ckpt if training had started; "
              "resume: run the same command with --ckpt_path last", file=sys.stderr)
        raise SystemExit(128 + 15) from None
    finally:  # what a command refused at start held back is not printed after its error
        console.hold(False)

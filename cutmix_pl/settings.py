"""The settings of one command: the choices made for the user, and what it takes from the checkpoint it names.

``run_plan.py`` calls these on the parsed config before anything is built: a setting left to the machine is chosen
and recorded, the ``--ckpt_path`` checkpoint is read once, and its model settings are checked against what the
command asks (a network class from a file is never taken unasked; ``validate`` keeps the run's held-out split).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_only

from . import hardware
from .nets import net_differences
from .runs import flatten, is_seed, run_options, same_value

__all__ = ["NOTES", "check_loose_checkpoint", "checked_hparams", "choose_for_machine", "keep_run_seed", "note",
           "plain", "read_checkpoint", "settle_defaults", "split_from_checkpoint"]

# The recipes ship inside the package (a plain or wheel install has them); the top-level configs/ links here.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "cutmix.yaml"
LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
# DataModule arguments that say which training images were held out for validation: ``validate`` takes the run's.
SPLIT_KEYS = ("val_size", "split_seed")


# -- choices made for the user ---------------------------------------------------------------------------
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


def choose_for_machine(cfg: Namespace, resumed: dict[str, Any], training: bool = True) -> None:
    """Precision and memory format left null: the fastest measured safe here (``hardware.py``), printed and recorded
    in config.yaml. A resumed run keeps what it ran with, so that it continues as it would have. A bf16 precision
    asked for on a CPU without bf16 instructions is taken, with a line on its cost and the fix."""
    trainer, model = cfg.trainer, cfg.model
    if trainer.precision is not None:  # asked for: bf16 on a CPU that emulates it is warned about
        warning = hardware.bf16_warning(trainer.precision, trainer.accelerator)
        if warning:
            note(warning)
    if trainer.precision is None:
        trainer.precision = (resumed.get("trainer") or {}).get("precision")
    if model.get("channels_last") is None:
        model.channels_last = (resumed.get("model") or {}).get("channels_last")
    if trainer.precision is None or model.channels_last is None:
        choice, chosen = hardware.choose(trainer.accelerator), []
        hint = choice.hint if trainer.precision is None and training else ""  # about training precision
        if trainer.precision is None:
            trainer.precision = choice.precision
            chosen.append(f"trainer.precision={choice.precision}")
        if model.channels_last is None:
            model.channels_last = choice.channels_last
            chosen.append(f"model.channels_last={str(choice.channels_last).lower()}")
        note(f"{', '.join(chosen)} (the fastest measured safe on {choice.why}; set them to override)"
             + (f"; {hint}" if hint else ""))


# -- what comes from the checkpoint ---------------------------------------------------------------------
def keep_run_seed(cfg: Namespace, resumed: dict[str, Any]) -> None:
    """``seed_everything: true`` in a resume: the seed the run chose at its start (its config.yaml records the
    integer), so that the resumed run draws its data order as the run did."""
    if cfg.get("seed_everything") is True and is_seed(resumed.get("seed_everything")):
        cfg.seed_everything = resumed["seed_everything"]


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
            old = ", ".join(f"{k}={a!r}" for k, a, _ in diffs)
            new = ", ".join(f"{k}={b!r}" for k, _, b in diffs)
            if diffs[0][0] == "class_path":
                flags = f"--model.net {diffs[0][1]}"
                why = " (a network class is code: it is taken from a checkpoint only when the command names it)"
            else:
                flags, why = " ".join(f"--model.net.{k} {a}" for k, a, _ in diffs), " (or leave them out)"
            raise ValueError(f"--ckpt_path {cfg.ckpt_path} holds a model with {old} but the config asks for {new}; "
                             f"fix: pass {flags}{why}, or leave out --ckpt_path to train from scratch")
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


# -- small helpers -----------------------------------------------------------------------------------------
class Notes:
    """Lines about a command's settings, printed once (DDP-launched ranks parse the same command again). The CLI
    holds them until the command starts, so that a command refused at start prints its one error line only."""

    def __init__(self) -> None:
        self.held: list[str] | None = None

    def add(self, text: str) -> None:
        if rank_zero_only.rank != 0:
            return
        if self.held is None:
            print(f"cutmix-pl: {text}", file=sys.stderr)
        else:
            self.held.append(text)

    def release(self) -> None:
        held, self.held = self.held or [], None
        for text in held:
            self.add(text)


NOTES = Notes()


def note(text: str) -> None:
    NOTES.add(text)


def plain(value: Any) -> Any:
    """A parsed config as YAML would hold it (paths and other objects as strings), for comparing with a saved one."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

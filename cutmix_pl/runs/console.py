"""What a command prints: lines about its settings, held with Lightning's seed and device lines until the command
starts (a command refused at start prints its one error line only), errors cut to one line, and ``--help``."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, DefaultHelpFormatter, Namespace
from lightning.pytorch.utilities import rank_zero_only


class Held(logging.Filter):
    """Our notes, and a logger's records, held while ``held`` is a list, then handed on (on rank 0 only: DDP-launched
    ranks parse the same command again)."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.logger, self.held = (logging.getLogger(name) if name else None), None
        if self.logger is not None:
            self.logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.held is None:
            return True
        self.held.append(record)
        return False

    def note(self, text: str) -> None:
        if rank_zero_only.rank != 0:
            return
        if self.held is None:
            print(f"cutmix-pl: {text}", file=sys.stderr)
        else:
            self.held.append(text)

    def release(self) -> None:
        held, self.held = self.held or [], None
        for item in held:
            self.note(item) if isinstance(item, str) else self.logger.handle(item)


NOTES = Held()
# What a command prints before it starts: our notes, then Lightning's seed and device lines.
HELD = [NOTES, *(Held(name) for name in ("lightning.fabric.utilities.seed", "lightning.fabric.utilities.rank_zero",
                                          "lightning.pytorch.utilities.rank_zero"))]


def hold(on: bool) -> None:
    for held in HELD:
        held.held = [] if on else None


def start() -> None:
    for held in HELD:
        held.release()


class _NoAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet() -> None:
    """Drop the output that says nothing about this run."""
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)  # Lightning's advert for its cloud logger
        if not any(isinstance(f, _NoAdvert) for f in logger.filters):
            logger.addFilter(_NoAdvert())
    for message in (
        r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own code under newer torch
        # validate/test/predict write into <run>/<command>/: its best-model record matters only to training
        "The dirpath has changed from",
        # autocast keeps fp32 weights: the summary's 32-bit count is right
        "Precision bf16-mixed is not supported by the model summary",
        r".*self\.log\('(val_class/|hp_metric)",  # computed from values already reduced over the ranks
        # our DataModule checkpoints its place in the epoch (and the augmentation stream): a mid-epoch resume is exact
        "You're resuming from a checkpoint that ended before the epoch ended",
    ):
        warnings.filterwarnings("ignore", message=message)


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when it lies below it."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def plain(value: Any) -> Any:
    """A parsed config as YAML would hold it (paths and other objects as strings), for comparing with a saved one."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def concise(err: BaseException, cfg: Namespace | None = None) -> str:
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
        elif causes and outer and not cls:  # a plain value of the wrong type: name the key and the value
            given = re.search(r"Given value: (.*)", text)
            text = f"{outer.group(1)}={given.group(1).strip() if given else '?'}: {'; '.join(causes)}"
        elif causes:
            text = f"{cls.group(1) + ': ' if cls else ''}{'; '.join(causes)}"
    text = " ".join(text.split())
    if isinstance(err, ArgumentError) and not text.startswith("Problem with given class_path") and "fix:" not in text:
        text += "; fix: check the key and its value (python -m cutmix_pl fit --help lists every key and type)"
    return text


class HelpFormatter(DefaultHelpFormatter):
    """``--help`` lists every imported subclass of a key's type; for model.net (any ``nn.Module``) that is some 750
    torch classes (Lightning issue 20591): a long list shows this project's classes, a few others and a count."""

    def _get_help_string(self, action: Any) -> str:
        text = super()._get_help_string(action)
        head, sep, listed = text.partition(", known subclasses: ")
        names = listed[:-1].split(", ") if sep and listed.endswith(")") else []
        if len(names) <= 40:
            return text
        ours = [n for n in names if n.startswith("cutmix_pl.")]
        others = [n for n in names if n not in ours][:4]
        more = len(names) - len(ours) - len(others)
        return f"{head}{sep}{', '.join(ours + others)} and {more} more: any importable class of the type)"

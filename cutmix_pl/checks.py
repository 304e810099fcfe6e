"""The model's argument checks: each failure is one ValueError line naming the setting, its value, what is allowed
and the fix, which the CLI prints as its error (no traceback)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .schedules import SCHEDULES

__all__ = ["COMPILE_MODES", "check_optimizer", "check_settings", "require"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's modes


def require(ok: bool, setting: str, value: Any, problem: str, fix: str | None = None) -> None:
    """Raise ``ValueError("<setting>=<value!r> <problem>; fix: <fix>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{setting}={value!r} {problem}" + (f"; fix: {fix}" if fix else ""))


def check_settings(lr_schedule: str, warmup_epochs: float, label_smoothing: float, compile: bool | str,
                   grid_size: int) -> None:
    """``ImageClassifier``'s settings other than the network and the optimiser: the CLI's types let values such as
    ``--model.warmup_epochs .inf`` through, and Python callers have no type checks at all."""
    require(lr_schedule in SCHEDULES, "model.lr_schedule", lr_schedule,
            f"is not allowed: choose one of {', '.join(SCHEDULES)}")
    require(0 <= warmup_epochs < math.inf, "model.warmup_epochs", warmup_epochs, "is out of range: it must be a "
            "finite number >= 0", "e.g. 1 (the recipe's), or 0 for no warm-up")
    require(0.0 <= label_smoothing < 1.0, "model.label_smoothing", label_smoothing,
            "is out of range: it must lie in [0, 1)", "e.g. 0.1, or 0 for none")
    require(isinstance(compile, bool) or compile in COMPILE_MODES, "model.compile", compile, "is not allowed: "
            f"choose true, false or a torch.compile mode, one of {', '.join(COMPILE_MODES)}",
            "e.g. --model.compile reduce-overhead")
    require(not isinstance(grid_size, bool) and isinstance(grid_size, int) and grid_size >= 1, "model.grid_size",
            grid_size, "is out of range: it must be an integer >= 1 (images in the logged grid)",
            "e.g. 16, or model.log_images false for no grid")


def check_optimizer(factory: Callable[..., torch.optim.Optimizer]) -> None:
    """Build the optimiser once on a dummy parameter so a bad setting fails at start-up, not at step 0."""
    require(callable(factory), "model.optimizer", factory, "is not an optimiser factory", "give class_path (e.g. "
            "torch.optim.SGD) and init_args in YAML, or a callable params -> optimiser")
    try:
        probe = factory([nn.Parameter(torch.zeros(1))])
    except ValueError as err:  # torch's own checks ("Invalid learning rate: -1.0") name no key and no fix
        raise ValueError(f"model.optimizer: {' '.join(str(err).split())}; fix: set "
                         "model.optimizer.init_args to valid values (lr > 0, momentum >= 0, ...)") from None
    lr = probe.defaults.get("lr")
    require(not isinstance(lr, (int, float)) or lr > 0, "model.optimizer lr", lr, "is out of range: it must be > 0",
            "e.g. --model.optimizer.init_args.lr 0.1 (the recipe's)")
    for key, value in probe.defaults.items():  # torch takes lr=inf or momentum=nan, and the loss turns nan
        require(not isinstance(value, float) or math.isfinite(value), f"model.optimizer {key}", value,
                "is not a finite number", f"set model.optimizer.init_args.{key} to a finite value (the recipe's: "
                "configs/cutmix.yaml)")

"""Learning-rate schedules: one table of named multipliers of the base learning rate.

Each entry maps training progress in [0, 1] (after warm-up) to a multiplier; adding a schedule is one entry here
(``model.lr_schedule`` accepts every key of :data:`SCHEDULES`, and ``--help`` lists them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["SCHEDULES", "Schedule", "lr_factor", "steps_per_epoch"]

SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),  # to 0 (Loshchilov & Hutter 2017, no restarts)
    "linear": lambda p: 1.0 - p,  # to 0: what short budgets gain from (airbench)
    "step": lambda p: 0.1 ** ((p >= 0.5) + (p >= 0.75)),  # x0.1 at 50% and 75%, as He et al. 2016 (32k, 48k of 64k)
    "constant": lambda p: 1.0,
}

Schedule = Literal[tuple(SCHEDULES)]  # type: ignore[valid-type]  # the CLI's choices, from the table


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` of ``total``, after linear warm-up."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return SCHEDULES[schedule](progress)


def steps_per_epoch(trainer: Any, total: int) -> float:
    """Optimiser steps in one epoch of a Lightning ``trainer`` whose run has ``total`` steps, from the training
    loader: not ``total / max_epochs``, which is wrong when ``trainer.max_steps`` ends the run first (or alone, with
    ``max_epochs: -1``)."""
    if not math.isfinite(trainer.num_training_batches):
        trainer.fit_loop.setup_data()  # as estimated_stepping_batches does; with max_epochs -1 it does not
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches < 1:  # a loader without a length
        return total / max(1, trainer.max_epochs or 1)
    return math.ceil(batches / trainer.accumulate_grad_batches)

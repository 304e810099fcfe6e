"""Learning-rate schedules: one table of named multipliers of the base learning rate.

Each entry maps training progress in [0, 1] (after warm-up) to a multiplier; adding a schedule is one entry here
(``model.lr_schedule`` accepts every key of :data:`SCHEDULES`, and ``--help`` lists them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

__all__ = ["SCHEDULES", "Schedule", "lr_factor"]

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

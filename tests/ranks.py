"""A DataModule as one rank of a multi-process run, without starting the processes."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def as_rank(dm, rank: int, world: int, device: str = "cpu", max_epochs: int | None = None):
    """Attach a stand-in trainer with the attributes the DataModule reads (device, rank, world size, the broadcast
    of the seed), through its public ``trainer`` attribute; returns ``dm``."""
    strategy = SimpleNamespace(root_device=torch.device(device), broadcast=lambda obj, src=0: obj)
    dm.trainer = SimpleNamespace(strategy=strategy, global_rank=rank, world_size=world, max_epochs=max_epochs)
    return dm

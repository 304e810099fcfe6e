"""A test-only callback that records what each DDP rank saw, into ``<out>/rank<r>.json``.

Used by tests/runs/test_ddp.py through the CLI (``--trainer.callbacks+=ddp_probe.DDPProbe`` with this folder on
PYTHONPATH). Per rank it writes: the world size, each epoch's shard (the training split's indices), the labels,
lam of every training batch, a draw from the global torch stream, the global step and epoch at every training batch, and the
callback metrics after each validation epoch (fit and validate) and at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch


class DDPProbe(L.Callback):
    def __init__(self, out: str = "probe") -> None:
        self.out = out
        self.record: dict[str, Any] = {"shards": {}, "batches": [], "val_metrics": []}

    def _dump(self, trainer: L.Trainer) -> None:
        rec = dict(self.record, rank=trainer.global_rank, world_size=trainer.world_size,
                   local_rank=trainer.local_rank, env_rank=os.environ.get("RANK"),
                   final_metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
                   global_step=trainer.global_step, current_epoch=trainer.current_epoch)
        path = Path(self.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"rank{trainer.global_rank}.json").write_text(json.dumps(rec))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = trainer.datamodule._state.sampler  # the training loader's, kept with the resume position
        self.record["shards"][str(trainer.current_epoch)] = {
            "sampler_epoch": sampler.epoch, "indices": sampler.shard().tolist(), "split_size": sampler.size}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.record["batches"].append({
            "epoch": trainer.current_epoch, "batch_idx": batch_idx, "global_step": trainer.global_step,
            "labels": batch.labels.tolist(), "lam": batch.lam.tolist(),
            # a draw from the global torch stream, rank+1 numbers long, so that the ranks' streams part as a
            # rank's own dropout would part them: a resume must continue each rank's
            "global_draw": torch.rand(1 + trainer.global_rank)[-1].item()})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.record["val_metrics"].append({k: float(v) for k, v in trainer.callback_metrics.items()
                                           if k.startswith("val/")})
        self._dump(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer)

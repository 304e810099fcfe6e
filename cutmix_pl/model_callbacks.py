"""Callbacks the model brings with it (``ImageClassifier.configure_callbacks``): what a run reports besides its
metrics (``hp_metric``, the mixed-image grid, the confusion matrix), the stop on a non-finite loss, and what a
resume needs beside the weights (the global random state, the epoch's training means so far). None of them changes
what is trained."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from .viz import captioned_grid, confusion_image, denormalize, mix_captions

__all__ = ["BestValAccuracy", "GlobalRNGState", "MixedImageGrid", "NonFiniteLossWatch", "TrainMeansResume",
           "ValConfusionMatrix"]


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    logger = trainer.logger
    return logger if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero else None


def _classes(trainer: L.Trainer, k: int) -> list[str]:
    """The data's class names (index order), or the indices where the data names none."""
    names = getattr(trainer.datamodule, "classes", None)
    return list(names) if names is not None and len(names) == k else [str(i) for i in range(k)]


class MixedImageGrid(Callback):
    """Once per epoch, a captioned grid of the first training images as the network sees them (mixed), in
    TensorBoard (``train/mixed_images``), with each image's two labels and its own label's weight.

    Args:
        size: images in the grid.
    """

    def __init__(self, size: int = 16) -> None:
        self.size = size

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        logger = _tensorboard(trainer)
        if batch_idx != 0 or logger is None or not hasattr(batch, "partner"):
            return
        transform = getattr(trainer.datamodule, "transform", None)
        if transform is None:  # a mixed batch comes from this project's transform, which knows the statistics
            return
        mean, std = transform.mean, transform.std
        k = min(self.size, len(batch.images))
        images = denormalize(batch.images[:k], mean, std)
        names = _classes(trainer, int(pl_module.hparams.num_classes))
        grid = captioned_grid(images, mix_captions(batch.labels[:k], batch.partner[:k], batch.lam[:k], names))
        logger.experiment.add_image("train/mixed_images", grid, trainer.global_step, dataformats="HWC")


class ValConfusionMatrix(Callback):
    """The validation confusion matrix: each class's accuracy as ``val_class/<name>`` and the matrix as an image
    (``val/confusion_matrix``). Reads the logits ``validation_step`` returns; reduced over DDP ranks."""

    def __init__(self, num_classes: int) -> None:
        self.matrix = MulticlassConfusionMatrix(num_classes)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.matrix = self.matrix.to(pl_module.device)
        self.matrix.reset()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self.matrix.update(outputs, batch[1])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrix = self.matrix.compute()  # every rank joins the reduction under DDP
        self.matrix.reset()
        if trainer.sanity_checking:
            return
        per_class = matrix.diag().float() / matrix.sum(1).clamp_min(1)
        names = _classes(trainer, len(per_class))
        for name, acc in zip(names, per_class):
            pl_module.log(f"val_class/{name}", acc, sync_dist=False)
        logger = _tensorboard(trainer)
        if logger is not None:
            logger.experiment.add_image("val/confusion_matrix", confusion_image(matrix, names), trainer.global_step,
                                        dataformats="HWC")


class BestValAccuracy(Callback):
    """``hp_metric``: the best ``val/acc`` so far (TensorBoard's HPARAMS tab compares runs by it), kept in each
    checkpoint as ``best_val_acc`` so that a resumed run goes on from its best."""

    KEY = "best_val_acc"

    def __init__(self) -> None:
        self.best = 0.0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        acc = trainer.callback_metrics.get("val/acc")
        if acc is not None and not trainer.sanity_checking:
            self.best = max(self.best, float(acc))
            pl_module.log("hp_metric", self.best, sync_dist=False)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.KEY] = self.best

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.best = checkpoint.get(self.KEY, 0.0)


class NonFiniteLossWatch(Callback):
    """Stops a fit on a non-finite training loss, before its backward pass, naming where it became non-finite.
    Off a CPU the flag is read only every logging interval: reading it every step would make the host wait for
    the device every step."""

    def __init__(self) -> None:
        self.first: Tensor | None = None  # (epoch, batch, global step) of the first non-finite loss; -1s: none yet
        self.batch_idx = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.batch_idx = batch_idx  # on_before_backward is not told

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self.check(trainer, loss, self.batch_idx)

    def check(self, trainer: L.Trainer, loss: Tensor, batch_idx: int) -> None:
        # torch.full writes each value with a fill kernel; torch.tensor([...], device=...) would copy from host
        # memory, and that copy makes the host wait for the device every step.
        where = torch.stack([torch.full((), v, dtype=torch.long, device=loss.device)
                             for v in (trainer.current_epoch, batch_idx, trainer.global_step)])
        if self.first is None:
            self.first = torch.full((3,), -1, device=loss.device, dtype=torch.long)
        self.first = torch.where(~torch.isfinite(loss.detach()) & (self.first[0] < 0), where, self.first)
        every = self.read_every(trainer, loss.device)
        if (every > 0 and (trainer.global_step + 1) % every == 0) or batch_idx + 1 >= trainer.num_training_batches:
            epoch, idx, step = self.first.tolist()
            if epoch >= 0:
                raise FloatingPointError(
                    f"the training loss became non-finite at global step {step} (epoch {epoch}, batch {idx}); "
                    "fix: lower model.optimizer's lr, add warm-up (model.warmup_epochs), or check the data")

    def read_every(self, trainer: L.Trainer, device: torch.device) -> int:
        """Steps between reads of the flag (0: at the end of each epoch only): every step on a CPU, where a read
        costs nothing, else every logging interval (Lightning reads the logged values from the device then)."""
        return 1 if device.type == "cpu" else trainer.log_every_n_steps


class TrainMeansResume(Callback):
    """Keeps the epoch means ``train/loss_epoch`` and ``train/acc_dominant`` whole across a resume: each checkpoint
    carries the sums so far in the epoch under way, over all ranks, and whether the epoch's means were logged."""

    KEY = "train_epoch_sums"

    def __init__(self) -> None:
        self.logged_epoch = -1  # the last epoch whose means were logged
        self.saved: dict[str, Any] | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The model logs the means in its own hook, right after this one; checkpoint callbacks run after both.
        self.logged_epoch = trainer.current_epoch

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        loss, acc = pl_module.train_loss, pl_module.train_acc
        gathered = pl_module.all_gather(torch.stack([loss.total, loss.weight, acc.total, acc.weight]).float())
        checkpoint[self.KEY] = {"epoch": trainer.current_epoch, "logged": self.logged_epoch == trainer.current_epoch,
                                "sums": (gathered.sum(0) if gathered.dim() > 1 else gathered).cpu()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saved = checkpoint.get(self.KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved, self.saved = self.saved, None
        if saved is None or trainer.global_rank != 0:
            return
        loss, acc = pl_module.train_loss, pl_module.train_acc
        sums = [s.clone() for s in saved["sums"].to(loss.total.device).unbind()]
        if saved["epoch"] == trainer.current_epoch:  # resumed inside the epoch, or at its end before its means
            loss.total, loss.weight, acc.total, acc.weight = sums
        elif not saved["logged"] and trainer.logger is not None and sums[1] > 0:
            # saved after the epoch's validation, stopped before its means were written (a kill): Lightning goes on
            # with the next epoch, so they are written here, at the step where Lightning would have written them
            means = {"train/loss_epoch": (sums[0] / sums[1]).item(), "train/acc_dominant": (sums[2] / sums[3]).item()}
            trainer.logger.log_metrics({**means, "epoch": saved["epoch"]}, step=max(trainer.global_step - 1, 0))


class GlobalRNGState(Callback):
    """Saves the global torch (CPU and CUDA), NumPy and Python random states in each checkpoint and restores them
    on resume, so that anything drawing from them (dropout in a user's network, a user's augmentation) continues
    exactly. Stored as tensors and ints only: checkpoints still load with ``torch.load(weights_only=True)``."""

    KEY = "global_rng_states"
    PER_RANK = "global_rng_states_per_rank"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.KEY] = rng_states()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # Only rank 0's dict reaches the file, and each rank's streams are its own (its GPU's CUDA generator
            # above all): it carries every rank's, gathered (all ranks save together).
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, checkpoint[self.KEY])
            checkpoint[self.PER_RANK] = gathered

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        per_rank = checkpoint.get(self.PER_RANK) or []
        if len(per_rank) == trainer.world_size > 1:
            set_rng_states(per_rank[trainer.global_rank])
        elif self.KEY in checkpoint:  # one process, or saved with another number of them: rank 0's
            set_rng_states(checkpoint[self.KEY])


def rng_states() -> dict[str, Any]:
    """The global torch, NumPy and Python RNG states, as tensors and ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "torch.cuda" in states and torch.cuda.is_available() and len(states["torch.cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))

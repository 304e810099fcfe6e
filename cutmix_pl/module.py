"""The LightningModule: a CIFAR ResNet trained with a soft-target cross-entropy, its metrics and optimiser."""

from __future__ import annotations

import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassConfusionMatrix

from . import cifar
from .metrics import WeightedMean
from .resnet import ResNet, Shortcut
from .schedules import SCHEDULES, Schedule, lr_factor
from .viz import captioned_grid, confusion_image, denormalize, mix_captions

__all__ = ["ImageClassifier", "SoftTargetCrossEntropy", "lr_factor"]


class SoftTargetCrossEntropy(nn.Module):
    """-(t * log_softmax(z)).sum(-1).mean() for probability-vector targets t; integer labels are one-hot.

    Label smoothing lives here and only here (see ``augment``): t <- (1 - eps) * t + eps / K, which equals
    ``F.cross_entropy(..., label_smoothing=eps)`` on one-hot targets.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} is out of range: it must lie in [0, 1)")
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        eps = self.label_smoothing
        if not targets.is_floating_point():
            # Integer labels pick their log-probability without building one-hot rows (F.one_hot on a CPU also
            # reads the labels' range back); smoothed, -t.log_p = (1 - eps) * nll - eps * mean(log_p).
            nll = -log_p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
            return ((1.0 - eps) * nll - eps * log_p.mean(-1)).mean() if eps else nll.mean()
        if eps:
            targets = targets * (1.0 - eps) + eps / logits.shape[-1]
        return -(targets * log_p).sum(-1).mean()


def _rng_states() -> dict[str, Any]:
    """The global torch (CPU and CUDA), NumPy and Python RNG states, as tensors and ints only, so that
    checkpoints still load with ``torch.load(weights_only=True)`` (Lightning's default)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "torch.cuda" in states and torch.cuda.is_available() and len(states["torch.cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _describe(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimiser's class and settings as loggable scalars, e.g. {"class": "SGD", "lr": 0.1, ...}; switches that
    pick an implementation (foreach, fused, ...) are left out."""
    out: dict[str, Any] = {"class": type(optimizer).__name__}
    for key, value in optimizer.defaults.items():
        if key in ("foreach", "fused", "differentiable", "capturable") or value is None:
            continue
        if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
            value = str(tuple(value))  # e.g. Adam's betas
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out


def _default_sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


class ImageClassifier(L.LightningModule):
    """CIFAR ResNet trained on (possibly mixed) soft targets.

    Args:
        depth: ResNet depth, 6n+2 (20, 32, 44, 56, 110, ...).
        num_classes: output classes; linked from ``data.num_classes`` by the CLI.
        shortcut: ``A`` (parameter-free, the paper's) or ``B`` (1x1 projections).
        width: channels of the first stage (16 in the paper).
        optimizer: optimiser factory from YAML (``class_path: torch.optim.SGD`` + ``init_args``); default SGD,
            lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4.
        lr_schedule: per-step multiplier, a name in ``schedules.SCHEDULES``: ``cosine`` to 0, ``linear`` to 0,
            ``step`` (x0.1 at 50% and 75%) or ``constant``.
        warmup_epochs: linear warm-up from 0, in epochs (fractions allowed), >= 0.
        label_smoothing: smoothing of the targets in the loss, in [0, 1); applied once, mixed or not.
        channels_last: run the network in channels-last memory format (faster convolutions on GPUs).
        compile: ``torch.compile`` the network.
        tta_flip: average predictions over the image and its mirror image in ``test`` and ``predict``.
        log_images: once per epoch, log a captioned grid of the first mixed training images to TensorBoard.
        grid_size: number of images in that grid.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: Shortcut = "A", width: int = 16,
                 optimizer: OptimizerCallable | None = None, lr_schedule: Schedule = "cosine",
                 warmup_epochs: float = 0.0, label_smoothing: float = 0.0, channels_last: bool = False,
                 compile: bool = False, tta_flip: bool = False, log_images: bool = True, grid_size: int = 16) -> None:
        super().__init__()
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"model.lr_schedule={lr_schedule!r} is not allowed: choose one of {', '.join(SCHEDULES)}")
        if not warmup_epochs >= 0:
            raise ValueError(f"model.warmup_epochs={warmup_epochs!r} is out of range: it must be >= 0")
        if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
            raise ValueError(f"model.grid_size={grid_size!r} is out of range: it must be an integer >= 1 (images in "
                             "the logged grid); fix: e.g. 16, or model.log_images false for no grid")
        self.save_hyperparameters(ignore=["optimizer"])
        self.net = ResNet(depth, num_classes, shortcut, width=width)
        # one uint8 image, as batches arrive: lets Lightning's model summary count FLOPs (else a column of zeros)
        self.example_input_array = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
        self.criterion = SoftTargetCrossEntropy(label_smoothing)
        self.optimizer_factory = optimizer or _default_sgd
        probe = self._check_optimizer()
        # TensorBoard's HPARAMS tab shows what Lightning logs, hparams_initial: the optimiser goes there, read off
        # a built instance (so defaults show too), but not into the checkpoint's hyperparameters, which the CLI
        # re-reads as model arguments on --ckpt_path. Not named "optimizer": load_from_checkpoint(hparams_file=
        # the logged hparams.yaml) passes keys that name __init__ arguments back in. (A subclass that calls
        # save_hyperparameters again after this resets hparams_initial and drops the entry.)
        self._hparams_initial["optimizer_settings"] = _describe(probe)
        # Training metrics are updated every step, so they must not make the host wait for a GPU (metrics.py).
        self.train_acc = WeightedMean()
        self.train_loss = WeightedMean()
        for stage in ("val", "test"):
            setattr(self, f"{stage}_loss", WeightedMean())  # weighted by images, synced exactly
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, average="micro"))
            setattr(self, f"{stage}_top5", MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"))
            setattr(self, f"{stage}_ece", MulticlassCalibrationError(num_classes, n_bins=15, norm="l1"))
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.best_val_acc = 0.0
        self._nonfinite: Tensor | None = None

    def _check_optimizer(self) -> torch.optim.Optimizer:
        """Build the optimiser once on a dummy parameter so a bad setting fails at start-up, not at step 0."""
        if not callable(self.optimizer_factory):
            raise ValueError(f"model.optimizer={self.optimizer_factory!r} is not an optimiser factory; fix: give "
                             "class_path (e.g. torch.optim.SGD) and init_args in YAML, or a callable params -> optimiser")
        try:
            probe = self.optimizer_factory([nn.Parameter(torch.zeros(1))])
        except ValueError as err:  # torch's own checks ("Invalid learning rate: -1.0") name no key and no fix
            raise ValueError(f"model.optimizer: {' '.join(str(err).split())}; fix: set "
                             "model.optimizer.init_args to valid values (lr > 0, momentum >= 0, ...)") from None
        lr = probe.defaults.get("lr")
        if isinstance(lr, (int, float)) and not lr > 0:
            raise ValueError(f"model.optimizer lr={lr!r} is out of range: it must be > 0")
        return probe

    def configure_model(self) -> None:
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        # Module.compile() compiles in place: unlike torch.compile(module) it adds no "_orig_mod." to the
        # state-dict keys, so a checkpoint of a compiled run loads into an uncompiled model (visualize.py, CPU).
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits = self(batch.images)
        loss = self.criterion(logits, batch.targets)
        self._watch_finite(loss, batch_idx)
        # With soft targets "accuracy" needs a reference label: the one holding most of each sample's mass.
        dominant = batch.targets.argmax(-1) if batch.targets.is_floating_point() else batch.targets
        n = len(batch.images)
        self.train_acc.update((logits.detach().argmax(-1) == dominant).float().mean(), n)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        self.train_loss.update(loss, n)  # the epoch mean, reduced over DDP ranks
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/acc_dominant", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        # self.log turns a Python float into a tensor with a host-to-device copy, a synchronisation on a GPU;
        # torch.full writes it with a kernel instead.
        lr = torch.full((), self.trainer.optimizers[0].param_groups[0]["lr"], device=loss.device)
        self.log("train/lr", lr, on_step=True, on_epoch=False, batch_size=n)
        if batch_idx == 0 and self.hparams.log_images:
            self._log_grid(batch)
        return loss

    def _watch_finite(self, loss: Tensor, batch_idx: int) -> None:
        """Stop on a non-finite loss, naming where. On a GPU the flag is read only every logging interval,
        since reading it every step would make the host wait for the device every step."""
        # torch.full writes each value with a fill kernel; torch.tensor([...], device=...) would copy from host
        # memory, and that copy makes the host wait for the device every step.
        where = torch.stack([torch.full((), v, dtype=torch.long, device=loss.device)
                             for v in (self.current_epoch, batch_idx, self.global_step)])
        bad = ~torch.isfinite(loss.detach())
        if self._nonfinite is None:
            self._nonfinite = torch.full((3,), -1, device=loss.device, dtype=torch.long)
        self._nonfinite = torch.where(bad & (self._nonfinite[0] < 0), where, self._nonfinite)
        every = self._watch_read_every(loss.device)
        if (every > 0 and (self.global_step + 1) % every == 0) or batch_idx + 1 >= self.trainer.num_training_batches:
            epoch, idx, step = self._nonfinite.tolist()
            if epoch >= 0:
                raise FloatingPointError(
                    f"the training loss became non-finite at global step {step} (epoch {epoch}, batch {idx}); "
                    "fix: lower model.optimizer's lr, add warm-up (model.warmup_epochs), or check the data")

    def _watch_read_every(self, device: torch.device) -> int:
        """Steps between reads of the non-finite flag (0: at the end of each epoch only): every step on a CPU,
        where a read costs nothing, else every logging interval (Lightning reads the logged values from the
        device then anyway)."""
        return 1 if device.type == "cpu" else self.trainer.log_every_n_steps

    def _log_grid(self, batch: Any) -> None:
        logger = self.logger
        if not isinstance(logger, TensorBoardLogger) or self.global_rank != 0:
            return
        k = min(self.hparams.grid_size, len(batch.images))
        images = denormalize(batch.images[:k], cifar.MEAN, cifar.STD)
        captions = mix_captions(batch.labels[:k], batch.partner[:k], batch.lam[:k], cifar.CLASSES)
        grid = captioned_grid(images, captions)
        logger.experiment.add_image("train/mixed_images", grid, self.global_step, dataformats="HWC")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = int(round(self.hparams.warmup_epochs * per_epoch))
        schedule = self.hparams.lr_schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation -----------------------------------------------------------------------------------
    def _predict_logits(self, images: Tensor) -> Tensor:
        logits = self(images)
        if self.hparams.tta_flip and not self.trainer.validating:
            logits = torch.logsumexp(torch.stack([F.log_softmax(logits, -1),
                                                  F.log_softmax(self(images.flip(3)), -1)]), 0) - math.log(2)
        return logits

    def _eval_step(self, stage: str, batch: Any) -> Tensor:
        images, labels = batch
        logits = self._predict_logits(images)
        loss = self.criterion(logits, labels)
        acc, top5, ece = (getattr(self, f"{stage}_{k}") for k in ("acc", "top5", "ece"))
        acc(logits, labels)
        top5(logits, labels)
        ece(logits.float().softmax(-1), labels)
        n = len(labels)
        # A WeightedMean, not self.log(sync_dist=True): Lightning's mean sync floors the integer image count when
        # ranks hold unequal numbers of images (Lightning issue #21838), inflating the loss under DDP.
        mean_loss = getattr(self, f"{stage}_loss")
        mean_loss.update(loss, n)
        self.log(f"{stage}/loss", mean_loss, on_epoch=True, batch_size=n)
        self.log(f"{stage}/acc", acc, on_epoch=True, prog_bar=True, batch_size=n)
        self.log(f"{stage}/acc_top5", top5, on_epoch=True, batch_size=n)
        self.log(f"{stage}/ece", ece, on_epoch=True, batch_size=n)
        return logits

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_confusion.update(self._eval_step("val", batch), batch[1])

    def on_validation_epoch_end(self) -> None:
        matrix = self.val_confusion.compute()  # every rank joins the reduction under DDP
        self.val_confusion.reset()
        if self.trainer.sanity_checking:
            return
        per_class = matrix.diag().float() / matrix.sum(1).clamp_min(1)
        names = cifar.CLASSES if len(cifar.CLASSES) == len(per_class) else [str(i) for i in range(len(per_class))]
        for name, acc in zip(names, per_class):
            self.log(f"val_class/{name}", acc, sync_dist=False)
        if isinstance(self.logger, TensorBoardLogger) and self.global_rank == 0:
            self.logger.experiment.add_image("val/confusion_matrix", confusion_image(matrix, names),
                                             self.global_step, dataformats="HWC")
        acc = self.trainer.callback_metrics.get("val/acc")
        if acc is not None:
            self.best_val_acc = max(self.best_val_acc, float(acc))
            self.log("hp_metric", self.best_val_acc, sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_val_acc"] = self.best_val_acc
        checkpoint["global_rng_states"] = _rng_states()  # anything drawing from them resumes exactly

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written while the network was wrapped by torch.compile(module) carry "_orig_mod." keys.
        state = checkpoint.get("state_dict")
        if state and any("._orig_mod." in k for k in state):
            checkpoint["state_dict"] = {k.replace("._orig_mod.", "."): v for k, v in state.items()}
        self._check_compatible(checkpoint)
        self.best_val_acc = checkpoint.get("best_val_acc", 0.0)
        if "global_rng_states" in checkpoint:
            _set_rng_states(checkpoint["global_rng_states"])

    def _check_compatible(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of another architecture fails here in one line, not in load_state_dict's size dump."""
        where = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        what = f"the checkpoint {where}" if where else "the checkpoint"
        saved = checkpoint.get("hyper_parameters") or {}
        diffs = [(k, saved[k], self.hparams[k]) for k in ("depth", "num_classes", "width", "shortcut")
                 if k in saved and k in self.hparams and saved[k] != self.hparams[k]]
        if diffs:
            theirs = ", ".join(f"{k}={a!r}" for k, a, _ in diffs)
            ours = ", ".join(f"{k}={b!r}" for k, _, b in diffs)
            flags = " ".join(f"--model.{k} {a}" for k, a, _ in diffs if k != "num_classes")
            fix = f"pass {flags}" if flags else "use a checkpoint trained on this data set"
            raise ValueError(f"{what} holds a model with {theirs} but this run builds {ours}; fix: {fix}, "
                             "or leave out --ckpt_path to train from scratch")
        own = self.state_dict()
        for key, value in (checkpoint.get("state_dict") or {}).items():
            if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"{what} does not fit this model: {key} has shape {list(value.shape)} there and "
                                 f"{list(own[key].shape)} here; fix: pass the --model.depth/width/shortcut it was "
                                 "trained with, or leave out --ckpt_path to train from scratch")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self._predict_logits(images).float().softmax(-1)
        out = {"pred": probs.argmax(-1), "prob": probs}
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            out["label"] = batch[1]
        if isinstance(batch, (tuple, list)) and len(batch) > 2:
            out["index"] = batch[2]
        return out

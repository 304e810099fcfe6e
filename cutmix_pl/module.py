"""The LightningModule: a network (ResNet-20 by default) trained with a soft-target cross-entropy, its metrics and
optimiser. What it reports besides metrics, its watch on the loss and the global random state live in
``model_callbacks.py``; its argument checks in ``checks.py``."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from . import cifar
from .checks import check_optimizer, check_settings, require
from .metrics import WeightedMean, stage_metrics
from .model_callbacks import (BestValAccuracy, GlobalRNGState, MixedImageGrid, NonFiniteLossWatch, TrainMeansResume,
                              ValConfusionMatrix)
from .nets import check_compatible, describe, make_network
from .schedules import Schedule, lr_factor, steps_per_epoch

__all__ = ["ImageClassifier", "SoftTargetCrossEntropy", "lr_factor"]


class SoftTargetCrossEntropy(nn.Module):
    """-(t * log_softmax(z)).sum(-1).mean() for probability-vector targets t; integer labels are one-hot.

    Label smoothing lives here and only here (see ``augment``): t <- (1 - eps) * t + eps / K, which equals
    ``F.cross_entropy(..., label_smoothing=eps)`` on one-hot targets.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        require(0.0 <= label_smoothing < 1.0, "label_smoothing", label_smoothing,
                "is out of range: it must lie in [0, 1)")
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


def _default_sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


class ImageClassifier(L.LightningModule):
    """An image classifier (a CIFAR ResNet by default) trained on (possibly mixed) soft targets.

    Args:
        net: the network, any ``nn.Module`` from images to ``num_classes`` logits; in YAML ``class_path`` +
            ``init_args`` (the CLI links ``init_args.num_classes`` to the data). Default: ResNet-20
            (``cutmix_pl.resnet.ResNet``, depth 20, shortcut A, width 16). A network built in Python is recorded in
            checkpoints by its class and its ``init_args`` attribute (the ResNet has one), and rebuilt from them.
        num_classes: output classes; linked from ``data.num_classes`` by the CLI.
        optimizer: optimiser factory from YAML (``class_path: torch.optim.SGD`` + ``init_args``); default SGD,
            lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4.
        lr_schedule: per-step multiplier, a name in ``schedules.SCHEDULES``: ``cosine`` to 0, ``linear`` to 0,
            ``step`` (x0.1 at 50% and 75%) or ``constant``.
        warmup_epochs: linear warm-up from 0, in epochs (fractions allowed), >= 0.
        label_smoothing: smoothing of the targets in the training loss, in [0, 1); applied once, mixed or not.
            The validation and test loss are plain cross-entropy, comparable across settings.
        channels_last: run the network in channels-last memory format (faster convolutions on GPUs and on x86
            CPUs with AVX2 or AVX-512); None: the CLI chooses for the machine at start (``hardware.py``), plain
            Python keeps NCHW.
        compile: ``torch.compile`` the network: true (the default mode) or a mode name; ``reduce-overhead`` also
            captures the network's forward and backward as CUDA graphs on a GPU (pair it with ``data.drop_last``:
            each new batch shape is a new graph).
        tta_flip: average predictions over the image and its mirror image in ``test`` and ``predict``.
        log_images: once per epoch, log a captioned grid of the first mixed training images to TensorBoard.
        grid_size: number of images in that grid.
    """

    def __init__(self, net: nn.Module | None = None, num_classes: int = cifar.NUM_CLASSES, optimizer: OptimizerCallable | None = None,
                 lr_schedule: Schedule = "cosine", warmup_epochs: float = 1.0, label_smoothing: float = 0.0,
                 channels_last: bool | None = None, compile: bool | str = False, tta_flip: bool = False,
                 log_images: bool = True, grid_size: int = 16) -> None:
        super().__init__()
        check_settings(lr_schedule, warmup_epochs, label_smoothing, compile, grid_size)
        self.net = make_network(net, num_classes)
        self.optimizer_factory = optimizer or _default_sgd
        check_optimizer(self.optimizer_factory)
        # From the CLI the network and optimiser arrive built, and Lightning records them as the config gave them
        # (class_path + init_args): TensorBoard's HPARAMS tab and what a checkpoint rebuilds. A network built in Python
        # is recorded in that form too, not as an object (which would pickle code); an optimiser factory is not.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attribute 'net' is an instance of `nn.Module`")
            self.save_hyperparameters()
        if not isinstance(self.hparams.get("optimizer"), dict):
            self.hparams.pop("optimizer", None)
        recorded = self.hparams.get("net")
        self.save_hyperparameters({"net": recorded if isinstance(recorded, dict) else
                                   describe(self.net, getattr(self.net, "init_args", {}))})
        # one uint8 image, as batches arrive: lets Lightning's model summary count FLOPs (else a column of zeros)
        self.example_input_array = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
        self.criterion = SoftTargetCrossEntropy(label_smoothing)
        # val/test loss: plain cross-entropy, so that it compares across runs with any label_smoothing (as timm's)
        self.eval_criterion = SoftTargetCrossEntropy()
        # Training metrics are updated every step, so they must not make the host wait for a GPU (metrics.py).
        self.train_acc, self.train_loss = WeightedMean(), WeightedMean()
        self.eval_loss = nn.ModuleDict({stage: WeightedMean() for stage in ("val", "test")})
        self.eval_metrics = nn.ModuleDict({stage: stage_metrics(stage, num_classes) for stage in ("val", "test")})

    def configure_callbacks(self) -> list[Callback]:
        callbacks: list[Callback] = [GlobalRNGState(), NonFiniteLossWatch(), TrainMeansResume(),
                                     ValConfusionMatrix(self.hparams.num_classes), BestValAccuracy()]
        if self.hparams.log_images:
            callbacks.append(MixedImageGrid(self.hparams.grid_size))
        return callbacks

    def setup(self, stage: str) -> None:
        # Lightning sets up the data first: the summary's input is then one of its images (a folder's 64x64)
        size = getattr(self.trainer.datamodule, "image_size", None) or (32, 32)
        self.example_input_array = torch.zeros(1, 3, *size, dtype=torch.uint8)

    def configure_model(self) -> None:
        if self.hparams.channels_last:  # None (not chosen) is NCHW
            self.net.to(memory_format=torch.channels_last)
        # Module.compile() compiles in place: unlike torch.compile(module) it adds no "_orig_mod." to the
        # state-dict keys, so a checkpoint of a compiled run loads into an uncompiled model (visualize.py, CPU).
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net.compile(mode=None if self.hparams.compile is True else self.hparams.compile)
            self._compiled = True

    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits = self(batch.images)
        loss = self.criterion(logits, batch.targets)  # NonFiniteLossWatch checks it before the backward pass
        # With soft targets "accuracy" needs a reference label: the one holding most of each sample's mass.
        dominant = batch.targets.argmax(-1) if batch.targets.is_floating_point() else batch.targets
        n = len(batch.images)
        self.train_acc.update((logits.detach().argmax(-1) == dominant).float().mean(), n)
        self.train_loss.update(loss, n)  # the epoch mean, reduced over DDP ranks
        if self._writes_logs():
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
            # self.log turns a Python float into a tensor with a host-to-device copy, a synchronisation on a GPU;
            # torch.full writes it with a kernel instead.
            lr = torch.full((), self.trainer.optimizers[0].param_groups[0]["lr"], device=loss.device)
            self.log("train/lr", lr, on_step=True, on_epoch=False, batch_size=n)
        return loss

    def _writes_logs(self) -> bool:
        """Whether Lightning writes this step's values: after every ``trainer.log_every_n_steps``-th optimiser step.
        Values logged on other steps are dropped, yet each self.log call costs the host about a millisecond (it moves
        the value's record to the device), so per-step values are logged only when they will be written."""
        every = self.trainer.log_every_n_steps
        return bool(self.trainer.fast_dev_run) or (every > 0 and (self.global_step + 1) % every == 0)

    def on_train_epoch_end(self) -> None:
        # Logged once an epoch rather than every step: Lightning moves a logged metric's states to the device on
        # every self.log call (a module traversal, the dearest per-step cost of the fit loop on the host), and these
        # two are read only at the epoch's end. A resume completes them (TrainMeansResume).
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        self.log("train/acc_dominant", self.train_acc, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(round(self.hparams.warmup_epochs * steps_per_epoch(self.trainer, total)))
        if warmup > total:  # legal (a probe of the warm-up), but the run ends before its learning rate's peak
            rank_zero_warn(f"model.warmup_epochs={self.hparams.warmup_epochs} outlasts the run ({warmup} warm-up "
                           f"steps of {total}), so the learning rate never reaches its peak; fix: a smaller "
                           "model.warmup_epochs, or a longer trainer.max_epochs")
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
        n = len(labels)
        # A WeightedMean, not self.log(sync_dist=True): Lightning's mean sync floors the integer image count when
        # ranks hold unequal numbers of images (Lightning issue #21838), inflating the loss under DDP.
        loss = self.eval_loss[stage]
        loss.update(self.eval_criterion(logits, labels), n)
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=n)
        metrics = self.eval_metrics[stage]
        metrics.update(logits.float().softmax(-1), labels)  # probabilities: the calibration error needs them
        for name, metric in metrics.items():
            self.log(name, metric, on_epoch=True, prog_bar=name == f"{stage}/acc", batch_size=n)
        return logits

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step("val", batch)  # the logits, for ValConfusionMatrix

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self._predict_logits(images).float().softmax(-1)
        out = {"pred": probs.argmax(-1), "prob": probs}
        if isinstance(batch, (tuple, list)):  # (images, labels, indices), the last two optional
            out.update(zip(("label", "index"), batch[1:3]))
        return out

    # -- checkpoints ----------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written while the network was wrapped by torch.compile(module) carry "_orig_mod." keys.
        state = checkpoint.get("state_dict")
        if state and any("._orig_mod." in k for k in state):
            checkpoint["state_dict"] = {k.replace("._orig_mod.", "."): v for k, v in state.items()}
        self.check_compatible(checkpoint)

    def check_compatible(self, checkpoint: dict[str, Any], where: str | None = None) -> None:
        """A checkpoint of another network fails here in one line, not in load_state_dict's size dump."""
        check_compatible(checkpoint, self.hparams.get("net"), self.hparams.num_classes, self.state_dict(), where)

"""The model's metrics: a running weighted mean whose update never makes the host wait for the device, and the
classification metrics of an evaluation stage."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

__all__ = ["WeightedMean", "stage_metrics"]


class WeightedMean(Metric):
    """``sum(w * x) / sum(w)`` over updates of a scalar tensor ``x`` with a Python weight ``w`` (e.g. the batch
    size), summed exactly over DDP ranks before the division.

    torchmetrics' ``MeanMetric`` is the obvious choice but costs a host-device synchronisation per update on a
    GPU: it copies a Python weight to the device (``torch.as_tensor``) and tests for NaNs with ``if nans.any()``
    (and its ``nan_strategy="disable"`` drops the weights). Here an update is two in-place additions with the
    weight passed as a scalar kernel argument, so a training step can be queued while the GPU is still busy.
    A NaN input makes the mean NaN, which is what happened.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    total: Tensor
    weight: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        # float32, not float64: MPS has no float64, and weights up to 2**24 images add exactly in float32.
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: int | float) -> None:  # type: ignore[override]
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"WeightedMean.update takes a one-element tensor; got {type(value).__name__} "
                             f"{list(getattr(value, 'shape', []))}")
        self._keep_float32()
        self.total += value.detach().reshape(()).float() * weight
        self.weight += weight

    def reset(self) -> None:
        super().reset()
        self._keep_float32()

    def _keep_float32(self) -> None:
        # Lightning's 16-true / bf16-true precision casts the whole module with .to(dtype), metric states included
        # (torchmetrics guards only .half()/.float()/...); a bf16 sum of image counts stops counting at 256.
        if self.weight.dtype != torch.float32:
            self.total, self.weight = self.total.float(), self.weight.float()

    def compute(self) -> Tensor:
        return self.total / self.weight


def stage_metrics(stage: str, num_classes: int) -> MetricCollection:
    """Top-1 and top-5 accuracy and the calibration error (15 bins), logged as ``<stage>/acc``, ``<stage>/acc_top5``
    and ``<stage>/ece``; updated with probabilities."""
    # compute_groups off: top-1 and top-5 accuracy keep states of the same shape, and a first batch on which
    # they happen to agree would merge them for good.
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
    return MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro"), "acc_top5": top5,
                             "ece": MulticlassCalibrationError(num_classes, n_bins=15, norm="l1")},
                            prefix=f"{stage}/", compute_groups=False)

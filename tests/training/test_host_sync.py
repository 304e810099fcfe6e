"""A training step queues its work without reading anything back from the device.

On a GPU, reading a value (``item``, ``bool(t)``, ``tolist``, ``unique``, a boolean mask) or building a tensor
from host data makes the host wait until the device has finished all queued work, so Python can no longer run
ahead of the GPU. Those operations are visible on a CPU too, as aten ops: ``HostReads`` (conftest.py) records them
while a real Lightning fit runs its training steps, so this runs without a GPU (tests/training/test_module.py has the
CUDA check).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from conftest import HostReads
from cutmix_pl.augment import CutMix
from cutmix_pl.data import CIFAR10DataModule
from cutmix_pl.metrics import WeightedMean
from cutmix_pl.model_callbacks import MixedImageGrid, NonFiniteLossWatch
from cutmix_pl.module import ImageClassifier
from cutmix_pl.resnet import ResNet


def test_the_detector_sees_each_kind_of_read():
    x = torch.randn(6)
    for read in (lambda: x.sum().item(), lambda: bool((x > 0).any()), lambda: x.tolist(), lambda: x[x > 0],
                 lambda: torch.unique(x), lambda: torch.tensor(0.1), lambda: x.nonzero(), lambda: x.cpu(),
                 lambda: x.numpy(), lambda: torch.equal(x, x)):
        with HostReads() as h:
            read()
        assert h.found, read
    with HostReads() as h:
        torch.full((), 0.1) * x + x.sum()
    assert h.found == []


def test_weighted_mean_updates_without_reads_and_averages_by_weight():
    m, two, four = WeightedMean(), torch.tensor([2.0]), torch.tensor(4.0)
    with HostReads() as h:
        m.update(two, 3)
        m.update(four, 1)
    assert h.found == []
    assert float(m.compute()) == pytest.approx((2 * 3 + 4) / 4)
    with pytest.raises(ValueError, match="one-element tensor"):
        m.update(torch.ones(2), 1)


def test_weighted_mean_keeps_float32_sums_under_a_half_precision_module():
    """Lightning's bf16-true precision casts the module with .to(dtype); bf16 would stop counting at 256."""
    m = torch.nn.ModuleDict({"m": WeightedMean()}).to(torch.bfloat16)["m"]
    for _ in range(390):
        m.update(torch.tensor(1.0, dtype=torch.bfloat16), 128)
    assert m.weight.dtype == torch.float32 and float(m.weight) == 390 * 128
    m.reset()
    assert m.total.dtype == m.weight.dtype == torch.float32


class _Watched(ImageClassifier):
    """Records each training step's reads; reads the non-finite flag as on a GPU (every logging interval)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reads: list[tuple[int, int, list[str]]] = []
        self.grid_reads: list[tuple[int, list[str]]] = []

    def configure_callbacks(self) -> list[Callback]:
        callbacks = super().configure_callbacks()
        for cb in callbacks:
            if isinstance(cb, MixedImageGrid):  # record the reads of the image grid's hook too
                hook = cb.on_train_batch_start

                def watched(trainer, pl_module, batch, batch_idx, hook=hook):
                    with HostReads() as h:
                        hook(trainer, pl_module, batch, batch_idx)
                    self.grid_reads.append((batch_idx, sorted(set(h.found))))

                cb.on_train_batch_start = watched
            if isinstance(cb, NonFiniteLossWatch):  # its check follows the step: its reads count as the step's
                cb.read_every = lambda trainer, device: trainer.log_every_n_steps
                check = cb.on_before_backward

                def checked(trainer, pl_module, loss, check=check):
                    with HostReads() as h:
                        check(trainer, pl_module, loss)
                    batch_idx, step, found = self.reads[-1]
                    self.reads[-1] = (batch_idx, step, sorted(set(found) | set(h.found)))

                cb.on_before_backward = checked
        return callbacks

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        step = self.global_step
        with HostReads() as h:
            loss = super().training_step(batch, batch_idx)
        self.reads.append((batch_idx, step, sorted(set(h.found))))
        return loss


@pytest.mark.parametrize("mixer", [CutMix(prob=0.5), None], ids=["cutmix", "no-mixing"])
def test_training_steps_read_from_the_device_only_at_logging_steps(tiny_cifar, tmp_path, mixer):
    every = 2
    model = _Watched(net=ResNet(8, width=4), log_images=True, grid_size=4)
    data = CIFAR10DataModule(str(tiny_cifar), download=False, val_size=100, train_size=320, batch_size=64, mixer=mixer)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, log_every_n_steps=every,
                        logger=TensorBoardLogger(str(tmp_path)), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1)
    trainer.fit(model, data)
    per_epoch = trainer.num_training_batches
    assert len(model.reads) == 2 * per_epoch > 2 * every
    # the once-an-epoch image grid: captions and pixels are drawn on the host, at the first batch only
    assert [b for b, found in model.grid_reads if found] == [0, 0] and all("tolist" in f for _, f in model.grid_reads
                                                                             if f)
    for batch_idx, step, found in model.reads:
        if step == every - 1:  # the first logging step builds Lightning's logging state (one copy from host data)
            assert set(found) <= {"lift_fresh", "tolist"}, found
        elif (step + 1) % every == 0 or batch_idx == per_epoch - 1:  # the non-finite flag, read as on a GPU
            assert found == ["tolist"], (batch_idx, step, found)
        else:
            assert found == [], f"training step {step} (batch {batch_idx}) reads from the device: {found}"


@pytest.mark.cuda
def test_weighted_mean_and_the_hard_label_loss_do_not_synchronise_a_gpu():
    from cutmix_pl.module import SoftTargetCrossEntropy

    m = WeightedMean().cuda()
    logits, labels = torch.randn(8, 10, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        loss = SoftTargetCrossEntropy(0.1)(logits, labels)
        m.update(loss, 8)
        m.update(torch.full((), 0.1, device="cuda"), 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(m.compute()) == pytest.approx((float(loss) + 0.1) / 2, rel=1e-5)

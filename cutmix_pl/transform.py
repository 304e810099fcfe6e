"""The training transform: GPU-side, batched CutMix in a collate function, as one object.

A uint8 batch on whatever device holds it goes through random crop + flip, RandAugment (when on), normalisation and
the mixing (per-sample CutMix by default) in one call, as batched tensor ops with no Python loop over samples::

    transform = TrainTransform(CutMix(prob=0.5, num_classes=K))   # K classes (the DataModule sets them itself)
    transform.seed(0, device="cuda")
    batch = transform(images_uint8, labels, epoch)   # TrainBatch: images, soft targets, what was mixed

The DataModule calls it once per training batch, once the batch is on its device (``on_after_batch_transfer``);
a plain PyTorch loop can call it the same way, or wrap it as a DataLoader ``collate_fn`` on the CPU. It owns the
random stream (a ``torch.Generator`` on the batch's device) and that stream's checkpoint state, and the mix-off
schedule (timm's ``mixup_off_epoch``). There is no Lightning import here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .augment import Mixer, check_image_batch, crop_flip, crop_flip_draw, normalize
from .cifar import MEAN, STD
from .randaugment import RandAugment

__all__ = ["TrainBatch", "TrainTransform"]

class TrainBatch(NamedTuple):
    """A training batch after augmentation. ``targets`` are soft [B, K] when mixed, else integer labels."""

    images: Tensor
    targets: Tensor
    labels: Tensor  # each sample's own label
    partner: Tensor  # the label of the image pasted or blended in (== labels where unmixed)
    lam: Tensor  # weight of the own label, float32 [B] (1 where unmixed)


class TrainTransform:
    """uint8 [B, C, H, W] batch -> crop/flip -> RandAugment -> normalise -> mix, on the batch's device.

    Args:
        mixer: ``CutMix``, ``MixUp``, ``CutMixUp``, ``Cutout`` (a hole per image, hard labels) or None (none).
        mix_off_epoch: from this (0-based) epoch on, no mixing; negative counts back from ``max_epochs``
            (-2: the last two epochs unmixed); None: mix in every epoch.
        crop_padding: zero padding of the random crop in pixels (4 in He et al. 2016); 0: no crop.
        flip: random horizontal flips.
        randaugment: RandAugment per image after crop/flip (``randaugment.py``), or None.
        mean, std: per-channel statistics of the images in [0, 1] (CIFAR-10's by default), for the normalisation.
        max_epochs: the length of training, needed only for a negative ``mix_off_epoch`` (the DataModule sets it
            from ``trainer.max_epochs``).
        compile: ``torch.compile`` the arithmetic (crop/flip, normalisation, mixing) into a few fused kernels. The
            random draws stay outside (a handful of kernels on the transform's own generator), so the boxes,
            lambdas and labels are the uncompiled ones exactly and CutMix pixels stay exact copies; the
            normalisation may round differently by one float32 ulp. RandAugment, when on, runs uncompiled between
            crop and mix.
    """

    def __init__(self, mixer: Mixer | None = None, mix_off_epoch: int | None = None, crop_padding: int = 4,
                 flip: bool = True, mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                 max_epochs: int | None = None, randaugment: RandAugment | None = None, compile: bool = False) -> None:
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"data.crop_padding={crop_padding!r} is out of range: it must be an integer >= 0; fix: "
                             "pass --data.crop_padding 4 (He et al. 2016), or 0 to turn cropping off")
        if mixer is not None and not isinstance(mixer, Mixer):
            raise ValueError(f"mixer={mixer!r} must be a CutMix, MixUp, CutMixUp or Cutout (or None for no mixing); "
                             "fix: pass --data.mixer CutMix (or MixUp, CutMixUp, Cutout, null)")
        if randaugment is not None and not isinstance(randaugment, RandAugment):
            raise ValueError(f"randaugment={randaugment!r} must be a cutmix_pl.randaugment.RandAugment (or None); "
                             "fix: pass --data.randaugment RandAugment, or null")
        self.mixer, self.mix_off_epoch, self.max_epochs = mixer, mix_off_epoch, max_epochs
        self.randaugment = randaugment
        self.crop_padding, self.flip = crop_padding, flip
        self.mean, self.std = tuple(mean), tuple(std)
        self.compile = bool(compile)
        self.generator: torch.Generator | None = None
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._compiled: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (DDP spawn, checkpoints of the DataModule) rebuild the compiled function on first use."""
        return {**vars(self), "_compiled": None}

    def __repr__(self) -> str:
        return (f"TrainTransform(mixer={self.mixer!r}, mix_off_epoch={self.mix_off_epoch!r}, "
                f"crop_padding={self.crop_padding}, flip={self.flip}, randaugment={self.randaugment!r}, "
                f"compile={self.compile})")

    # -- the random stream ----------------------------------------------------------------------------
    def seed(self, seed: int, device: torch.device | str = "cpu") -> None:
        """Start a new stream on ``device`` (the device the batches will be on)."""
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.generator is None else {"rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state and self.generator is not None:
            self.generator.set_state(state["rng"].cpu().clone())  # a view of a shared storage crashes set_state

    # -- the mix-off schedule ---------------------------------------------------------------------------
    def mix_off(self) -> int | None:
        """The first unmixed epoch, with a negative ``mix_off_epoch`` counted back from ``max_epochs``."""
        off, max_epochs = self.mix_off_epoch, self.max_epochs
        if off is None or off >= 0:
            return off
        if max_epochs is None or max_epochs < 0:
            raise ValueError(f"data.mix_off_epoch={off} counts from the end of training, but trainer.max_epochs is "
                             f"{max_epochs} (no known end); fix: set trainer.max_epochs, or a mix_off_epoch >= 0")
        if off < -max_epochs:
            raise ValueError(f"data.mix_off_epoch={off} counts back past the start of training "
                             f"(trainer.max_epochs={max_epochs}); fix: "
                             + (f"a value in [-{max_epochs}, -1], " if max_epochs > 1 else "-1, ")
                             + "a value >= 0, or null to mix in every epoch")
        return max_epochs + off

    def mixing_on(self, epoch: int) -> bool:
        if self.mixer is None:
            return False
        off = self.mix_off()
        return off is None or epoch < off

    def set_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """New normalisation statistics (a folder dataset's, computed when it is first read)."""
        self.mean, self.std = tuple(mean), tuple(std)
        self._stats.clear()

    # -- the call ---------------------------------------------------------------------------------------
    def stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The normalisation's mean and std as tensors on ``device``, made once (no copy per step)."""
        stats = self._stats.get(device)
        if stats is None:
            stats = self._stats[device] = (torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device))
        return stats

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 images -> standardised float32."""
        return normalize(images, *self.stats(images.device))

    def __call__(self, images: Tensor, labels: Tensor, epoch: int = 0,
                 generator: torch.Generator | None = None) -> TrainBatch:
        """Augment a uint8 batch for ``epoch``, drawing from ``generator``, else the transform's own stream (else
        torch's global RNG)."""
        check_image_batch(images)
        gen = generator if generator is not None else self.generator
        crop = None
        if self.crop_padding or self.flip:
            crop = crop_flip_draw(len(images), self.crop_padding, self.flip, images.device, gen)
        if self.randaugment is not None:
            images, crop = self._apply_crop(images, crop), None
            images = self.randaugment(images, gen)
        draws = None
        if self.mixing_on(epoch):
            self.mixer.check_labels(labels, len(images), images.device)  # type: ignore[union-attr]
            draws = self.mixer.draw(images, gen)  # type: ignore[union-attr]
        apply = self._apply
        if self.compile:  # built on first use: compiling costs seconds, and copies of the transform drop it
            if self._compiled is None:
                self._compiled = torch.compile(self._apply, dynamic=False)
            apply = self._compiled
        return apply(images, labels, crop, draws, *self.stats(images.device))

    def _apply_crop(self, images: Tensor, crop: tuple[Tensor, Tensor, Tensor | None] | None) -> Tensor:
        return images if crop is None else crop_flip(images, self.crop_padding, crop)

    def _apply(self, images: Tensor, labels: Tensor, crop: tuple[Tensor, Tensor, Tensor | None] | None,
               draws: dict[str, Any] | None, mean: Tensor, std: Tensor) -> TrainBatch:
        """The drawn batch: crop/flip -> normalise -> mix, with no randomness and no host reads."""
        images = normalize(self._apply_crop(images, crop), mean, std)
        if draws is None:
            return TrainBatch(images, labels, labels, labels, torch.ones(len(labels), device=labels.device))
        mixed = self.mixer.apply(images, labels, draws)  # type: ignore[union-attr]
        partner = torch.where(mixed.lam < 1, labels[mixed.index], labels)  # nothing of another image: its own
        return TrainBatch(mixed.images, mixed.targets, labels, partner, mixed.lam)

"""Batched augmentations as pure tensor ops: CutMix, MixUp, their combination, and CIFAR crop/flip.

Everything here runs on whatever device holds the batch, with no Python loop over samples, so the same
code serves a DataLoader ``collate_fn`` on the CPU and a GPU-resident batch in
``LightningDataModule.on_after_batch_transfer``. There is no Lightning import in this module.

Randomness comes from torch on the batch's device: from the ``generator`` passed to a call when there is
one (the DataModule passes a per-rank, checkpointed generator), else from torch's global RNG, which
``lightning.seed_everything`` seeds.

Label smoothing is deliberately absent: it belongs to the loss (``SoftTargetCrossEntropy``), so it is applied
exactly once whatever the mixing. Smoothing mixed one-hot targets equals mixing smoothed ones, since
smoothing is affine: ``lam*S(a) + (1-lam)*S(b) = S(lam*a + (1-lam)*b)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import default_collate

Mode = Literal["elem", "batch"]
Pairing = Literal["perm", "roll"]

__all__ = [
    "Mixer",
    "CutMix",
    "MixUp",
    "CutMixUp",
    "Mixed",
    "MixCollate",
    "sample_beta",
    "to_soft_targets",
    "random_crop_flip",
    "normalize",
]

# Rounds of Marsaglia-Tsang proposals drawn at once. Each is accepted with probability > 0.95 for the
# shapes used here (>= 2/3 after boosting), so all 16 failing has probability < 1e-20.
_GAMMA_ROUNDS = 16
_TINY = 1e-30


def _log_standard_gamma(shape: float, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Log of n Gamma(shape, 1) draws (Marsaglia & Tsang 2000), vectorised, with an explicit generator.

    torch.distributions.Gamma cannot take a generator, which a per-rank, checkpointable stream needs.
    Shapes below 1 use the boost Gamma(a) = Gamma(a + 1) * U^(1/a), kept in log space so that tiny
    alphas do not underflow to 0/0 in the Beta ratio.
    """
    boost = shape < 1.0
    d = (shape + 1.0 if boost else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    x = torch.randn(_GAMMA_ROUNDS, n, device=device, generator=generator)
    u = torch.rand(_GAMMA_ROUNDS, n, device=device, generator=generator)
    v = (1.0 + c * x) ** 3
    log_v = torch.log(v.clamp_min(_TINY))
    accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * log_v)
    first = accept.to(torch.int8).argmax(0, keepdim=True)  # argmax returns the first maximal index
    out = math.log(d) + log_v.gather(0, first).squeeze(0)
    if boost:
        u1 = torch.rand(n, device=device, generator=generator)
        out = out + torch.log(u1.clamp_min(_TINY)) / shape
    return out


def sample_beta(alpha: float, n: int, *, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> Tensor:
    """n draws of Beta(alpha, alpha) as float32 on ``device``, as G1 / (G1 + G2) with G ~ Gamma(alpha)."""
    device = torch.device(device)
    g1 = _log_standard_gamma(alpha, n, device, generator)
    g2 = _log_standard_gamma(alpha, n, device, generator)
    return torch.sigmoid(g1 - g2)  # = G1 / (G1 + G2), stable in log space


def to_soft_targets(labels: Tensor, num_classes: int) -> Tensor:
    """Integer labels [B] -> float32 one-hot [B, K]; float [B, K] targets pass through as float32."""
    if labels.is_floating_point():
        return labels.to(torch.float32)
    return F.one_hot(labels, num_classes).to(torch.float32)


class Mixed(NamedTuple):
    """What a mixing call did, for logging and tests. ``lam`` is the weight of the sample's own label."""

    images: Tensor
    targets: Tensor
    index: Tensor
    lam: Tensor
    is_cutmix: Tensor


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r} is out of range: it must lie in [0, 1]")


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: choose one of {', '.join(map(repr, allowed))}")


class Mixer:
    """Shared machinery: argument checks, pairing, target mixing. Subclasses supply the pixel weights."""

    def __init__(self, alpha: float, prob: float, num_classes: int, mode: Mode, pairing: Pairing) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha={alpha!r} is out of range: it must be > 0 (Beta(alpha, alpha))")
        _check_unit("prob", prob)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} is out of range: it must be an integer >= 2")
        _check_choice("mode", mode, ("elem", "batch"))
        _check_choice("pairing", pairing, ("perm", "roll"))
        self.alpha = float(alpha)
        self.prob = float(prob)
        self.num_classes = num_classes
        self.mode = mode
        self.pairing = pairing

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    # -- checks -------------------------------------------------------------------------------------
    def _check_inputs(self, images: Tensor, labels: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a 4-D floating tensor [B, C, H, W]; got {got}")
        batch = images.shape[0]
        if batch < 1:
            raise ValueError("images must hold at least one sample; got an empty batch")
        k = self.num_classes
        if labels.is_floating_point():
            if labels.shape != (batch, k):
                raise ValueError(f"soft labels must have shape [B, K] = [{batch}, {k}]; got {list(labels.shape)}")
            return
        if labels.shape != (batch,) or labels.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
            raise ValueError(f"labels must be integer [B] = [{batch}] or float [B, K]; "
                             f"got {list(labels.shape)} {labels.dtype}")
        if labels.device.type == "cpu":
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"labels must lie in [0, {k - 1}] (num_classes={k}); got values in [{lo}, {hi}]")
        else:  # a host-side check would stall the GPU queue every step; assert on the device instead
            torch._assert_async(((labels >= 0) & (labels < k)).all(), f"labels must lie in [0, {k - 1}]")

    # -- pieces subclasses share --------------------------------------------------------------------
    def _draws(self, n: int) -> int:
        return n if self.mode == "elem" else 1

    def _expand(self, t: Tensor, n: int) -> Tensor:
        return t.expand(n) if self.mode == "batch" else t

    def _active(self, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        """Which samples are mixed: each (elem) or the whole batch (batch) with probability ``prob``."""
        coin = torch.rand(self._draws(n), device=device, generator=generator) < self.prob
        return self._expand(coin, n)

    def _partners(self, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        if self.pairing == "roll":
            return torch.arange(n, device=device).roll(1)
        return torch.randperm(n, device=device, generator=generator)

    def _lam(self, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        return self._expand(sample_beta(self.alpha, self._draws(n), device=device, generator=generator), n)

    def weights(self, images: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Return (partner weight per pixel, broadcastable to images; own-label weight lam [B])."""
        raise NotImplementedError

    # -- the call -----------------------------------------------------------------------------------
    def mix(self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Mixed:
        """Mix a batch; returns new images (the input is untouched), float32 targets and what was done."""
        self._check_inputs(images, labels)
        n, device = images.shape[0], images.device
        index = self._partners(n, device, generator)
        weight, lam = self.weights(images, generator)
        partner = images[index]
        if weight.dtype == torch.bool:
            mixed = torch.where(weight, partner, images)
        else:  # lerp is exact at weight 0 and 1, so a CutMix pixel inside a mixed batch stays a copy
            mixed = torch.lerp(images, partner, weight.to(images.dtype))
        soft = to_soft_targets(labels, self.num_classes)
        lam32 = lam.to(torch.float32)
        targets = lam32[:, None] * soft + (1.0 - lam32[:, None]) * soft[index]
        return Mixed(mixed, targets, index, lam32, self._is_cutmix(weight, n))

    def _is_cutmix(self, weight: Tensor, n: int) -> Tensor:
        return torch.full((n,), isinstance(self, CutMix), dtype=torch.bool, device=weight.device)

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        out = self.mix(images, labels, generator)
        return out.images, out.targets


class CutMix(Mixer):
    """CutMix (Yun et al. 2019, arXiv:1905.04899), one box and one lambda per sample by default.

    Args:
        alpha: Beta(alpha, alpha) concentration for lambda; the paper uses 1 (lambda uniform). Must be > 0.
        prob: probability that a sample (``elem``) or the batch (``batch``) is mixed; the paper's CIFAR runs
            use 0.5. In [0, 1].
        num_classes: number of classes K of the soft targets. At least 2.
        mode: ``elem`` gives every sample its own box and lambda; ``batch`` one for the whole batch, as the
            paper's reference code does.
        minmax: optional (min, max) box side as fractions of the image side, drawn independently for height
            and width, box kept inside the image (timm's ``cutmix_minmax``); lambda is then the area left.
        correct_lam: relabel with the area actually kept after clipping the box to the image (the paper's
            Algorithm A1 does this), so targets match pixels exactly. Off: the sampled lambda.
        pairing: ``perm`` pairs each sample with a random permutation of the batch; ``roll`` with its neighbour.
    """

    def __init__(self, alpha: float = 1.0, prob: float = 1.0, num_classes: int = 10, mode: Mode = "elem",
                 minmax: tuple[float, float] | None = None, correct_lam: bool = True,
                 pairing: Pairing = "perm") -> None:
        super().__init__(alpha, prob, num_classes, mode, pairing)
        if minmax is not None:
            lo, hi = (float(v) for v in minmax)
            if not 0.0 < lo < hi <= 1.0:
                raise ValueError(f"minmax={tuple(minmax)!r} is out of range: need 0 < min < max <= 1")
            minmax = (lo, hi)
        self.minmax = minmax
        self.correct_lam = bool(correct_lam)

    def boxes(self, n: int, height: int, width: int, device: torch.device,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Sample boxes (y1, y2, x1, x2), int64 [n], clipped to the image, and the sampled lambda [n]."""
        m = self._draws(n)
        if self.minmax is not None:  # timm's rand_bbox_minmax: sides uniform in [min, max) of the image side
            lo, hi = self.minmax
            u = torch.rand(4, m, device=device, generator=generator)
            cut_h = (int(height * lo) + u[0] * (int(height * hi) - int(height * lo))).long()
            cut_w = (int(width * lo) + u[1] * (int(width * hi) - int(width * lo))).long()
            y1 = (u[2] * (height - cut_h)).long()
            x1 = (u[3] * (width - cut_w)).long()
            y2, x2 = y1 + cut_h, x1 + cut_w
            lam = 1.0 - (cut_h * cut_w).float() / (height * width)
        else:  # the paper's Algorithm A1: side ratio sqrt(1 - lam), centre uniform, box clipped
            lam = sample_beta(self.alpha, m, device=device, generator=generator)
            ratio = torch.sqrt(1.0 - lam)
            cut_h = (height * ratio).long()  # truncation, as int() in the reference code
            cut_w = (width * ratio).long()
            cy = torch.randint(height, (m,), device=device, generator=generator)
            cx = torch.randint(width, (m,), device=device, generator=generator)
            y1 = (cy - cut_h // 2).clamp(0, height)
            y2 = (cy + cut_h // 2).clamp(0, height)
            x1 = (cx - cut_w // 2).clamp(0, width)
            x2 = (cx + cut_w // 2).clamp(0, width)
        return tuple(self._expand(t, n) for t in (y1, y2, x1, x2, lam))  # type: ignore[return-value]

    def weights(self, images: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        n, _, height, width = images.shape
        device = images.device
        y1, y2, x1, x2, lam = self.boxes(n, height, width, device, generator)
        active = self._active(n, device, generator)
        ys = torch.arange(height, device=device).view(1, height, 1)
        xs = torch.arange(width, device=device).view(1, 1, width)
        inside = ((ys >= y1.view(-1, 1, 1)) & (ys < y2.view(-1, 1, 1))
                  & (xs >= x1.view(-1, 1, 1)) & (xs < x2.view(-1, 1, 1)))
        inside = inside & active.view(-1, 1, 1)
        if self.correct_lam or self.minmax is not None:
            area = ((y2 - y1) * (x2 - x1)).float()
            lam = 1.0 - area / (height * width)
        lam = torch.where(active, lam, torch.ones_like(lam))
        return inside.unsqueeze(1), lam


class MixUp(Mixer):
    """MixUp (Zhang et al. 2018): pixels and targets are the same convex combination, lambda ~ Beta(alpha, alpha).

    Args as for :class:`CutMix`: ``alpha`` > 0, ``prob`` in [0, 1], ``num_classes`` >= 2, ``mode``
    ``elem`` (a lambda per sample) or ``batch`` (one per batch), ``pairing`` ``perm`` or ``roll``.
    """

    def __init__(self, alpha: float = 0.2, prob: float = 1.0, num_classes: int = 10, mode: Mode = "elem",
                 pairing: Pairing = "perm") -> None:
        super().__init__(alpha, prob, num_classes, mode, pairing)

    def weights(self, images: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        n, device = images.shape[0], images.device
        lam = self._lam(n, device, generator)
        lam = torch.where(self._active(n, device, generator), lam, torch.ones_like(lam))
        return (1.0 - lam).view(-1, 1, 1, 1), lam


class CutMixUp(Mixer):
    """CutMix or MixUp for each sample (``elem``) or batch (``batch``), as timm's ``Mixup`` with both on.

    Args:
        cutmix: the CutMix half (its alpha, minmax and correct_lam are used).
        mixup: the MixUp half (its alpha is used).
        switch_prob: probability of CutMix rather than MixUp for a mixed sample. In [0, 1].
        prob: probability that a sample (or the batch) is mixed at all. In [0, 1].
        mode: ``elem`` or ``batch``; overrides the halves' own modes.
        pairing: ``perm`` or ``roll``; overrides the halves' own pairing.
    """

    def __init__(self, cutmix: CutMix | None = None, mixup: MixUp | None = None, switch_prob: float = 0.5,
                 prob: float = 1.0, mode: Mode = "elem", pairing: Pairing = "perm") -> None:
        cutmix = cutmix or CutMix()
        mixup = mixup or MixUp(num_classes=cutmix.num_classes)
        if cutmix.num_classes != mixup.num_classes:
            raise ValueError(f"cutmix.num_classes={cutmix.num_classes} and mixup.num_classes="
                             f"{mixup.num_classes} must agree")
        super().__init__(cutmix.alpha, prob, cutmix.num_classes, mode, pairing)
        _check_unit("switch_prob", switch_prob)
        self.switch_prob = float(switch_prob)
        # The halves draw their boxes and lambdas in this mixer's mode; their own prob is superseded.
        self.cutmix, self.mixup = copy.copy(cutmix), copy.copy(mixup)
        for half in (self.cutmix, self.mixup):
            half.mode, half.pairing, half.prob = mode, pairing, 1.0

    def weights(self, images: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        n, device = images.shape[0], images.device
        box, lam_c = self.cutmix.weights(images, generator)
        blend, lam_m = self.mixup.weights(images, generator)
        use_cut = self._expand(torch.rand(self._draws(n), device=device, generator=generator) < self.switch_prob, n)
        active = self._active(n, device, generator)
        self._last_use_cut = use_cut & active
        weight = torch.where(use_cut.view(-1, 1, 1, 1), box.to(blend.dtype), blend)
        weight = weight * active.view(-1, 1, 1, 1)
        lam = torch.where(active, torch.where(use_cut, lam_c, lam_m), torch.ones_like(lam_c))
        return weight, lam

    def _is_cutmix(self, weight: Tensor, n: int) -> Tensor:
        return self._last_use_cut


class MixCollate:
    """A ``collate_fn`` that mixes on the CPU: ``DataLoader(ds, collate_fn=MixCollate(CutMix()))``.

    Picklable, so it works in DataLoader worker processes. Returns ``(images, soft_targets)``.
    """

    def __init__(self, mixer: Mixer, base: Callable[[list[Any]], Any] = default_collate) -> None:
        self.mixer, self.base = mixer, base

    def __call__(self, samples: list[Any]) -> tuple[Tensor, Tensor]:
        images, labels = self.base(samples)[:2]
        return self.mixer(images.float() if not images.is_floating_point() else images, labels)


def random_crop_flip(images: Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> Tensor:
    """The standard CIFAR augmentation for a whole batch: zero-pad, random crop back, random h-flip.

    One gather does both, with per-sample offsets, so it costs the same on any device and any dtype
    (uint8 in the data path, so that the gather moves a quarter of the bytes of float32).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W]; got shape {list(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding={padding!r} is out of range: it must be >= 0")
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4) if padding else images
    dy = torch.randint(2 * padding + 1, (n, 1), device=device, generator=generator)
    dx = torch.randint(2 * padding + 1, (n, 1), device=device, generator=generator)
    iy = dy + torch.arange(h, device=device)
    ix = dx + torch.arange(w, device=device)
    if flip:
        flipped = torch.rand(n, 1, device=device, generator=generator) < 0.5
        ix = torch.where(flipped, ix.flip(1), ix)
    rows = padded.gather(2, iy.view(n, 1, h, 1).expand(n, c, h, padded.shape[3]))
    return rows.gather(3, ix.view(n, 1, 1, w).expand(n, c, h, w))


def normalize(images: Tensor, mean: Tensor | Sequence[float], std: Tensor | Sequence[float],
              dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 [0, 255] (or float [0, 1]) images -> per-channel standardised floats, in one fused affine op.

    Pass ``mean``/``std`` as tensors already on the images' device in a hot loop: building them from Python
    lists is a host-to-device copy, which stalls a GPU every step.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    if images.shape[1] != std_t.shape[1]:
        raise ValueError(f"images have {images.shape[1]} channels but mean/std have {std_t.shape[1]}")
    scale_in = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    return torch.addcmul(-mean_t / std_t, images.to(torch.float32), scale_in / std_t).to(dtype)

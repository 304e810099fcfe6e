"""Batched augmentations as pure tensor ops: CutMix, MixUp, their combination, Cutout, and CIFAR crop/flip.

Everything here runs on whatever device holds the batch, with no Python loop over samples, so the same
code serves a DataLoader ``collate_fn`` on the CPU and a GPU-resident batch in
``LightningDataModule.on_after_batch_transfer``. There is no Lightning import in this module.

Randomness comes from torch on the batch's device: from the ``generator`` passed to a call when there is
one (``TrainTransform`` passes its own, per rank and checkpointed), else from torch's global RNG, which
``lightning.seed_everything`` seeds.

Label smoothing is deliberately absent: it belongs to the loss (``SoftTargetCrossEntropy``), so it is applied
exactly once whatever the mixing. Smoothing mixed one-hot targets equals mixing smoothed ones, since
smoothing is affine: ``lam*S(a) + (1-lam)*S(b) = S(lam*a + (1-lam)*b)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Mode = Literal["elem", "batch"]
Pairing = Literal["perm", "roll"]

__all__ = [
    "Mixer",
    "CutMix",
    "MixUp",
    "CutMixUp",
    "Cutout",
    "Mixed",
    "sample_beta",
    "to_soft_targets",
    "random_crop_flip",
    "check_image_batch",
    "crop_flip_draw",
    "crop_flip",
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
    if alpha == 1.0:  # Beta(1, 1) is U(0, 1): one kernel instead of the gamma sampler (the paper's setting)
        return torch.rand(n, device=device, generator=generator)
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r} is out of range: it must lie in [0, 1]")


def _check_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} is out of range: it must be an integer >= 2")


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: choose one of {', '.join(map(repr, allowed))}")


def _uniform_centres(m: int, height: int, width: int, sizes: Tensor, device: torch.device,
                     generator: torch.Generator | None) -> Tensor:
    """m box centres uniform over the pixels, float32 [2, m] (rows y, x) holding exact small integers: the papers'
    ``np.random.randint(H)``, ``np.random.randint(W)`` (CutMix's Algorithm A1, Cutout's reference code). ``sizes`` is
    [[H], [W]] as float32 on ``device``. A square image takes one kernel."""
    if height == width:
        return torch.randint(height, (2, m), device=device, generator=generator, dtype=torch.float32)
    return torch.rand(2, m, device=device, generator=generator).mul_(sizes).floor_()


def _check_label_batch(labels: Tensor, batch: int, device: torch.device, k: int | None, who: str) -> None:
    """Labels for a batch of ``batch`` images on ``device``: integer [B] in [0, K) or float [B, K] (``k``: K; None
    when the mixer ``who`` has no num_classes yet)."""
    if batch < 1:
        raise ValueError("images must hold at least one sample; got an empty batch")
    if k is None:
        raise ValueError(f"{who}: num_classes is not set: pass num_classes=K, or let the "
                         "DataModule set it from the data")
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a tensor, integer [B] or float [B, K]; got {type(labels).__name__}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but images on {device}: put both on one device")
    if labels.is_floating_point():
        if labels.shape != (batch, k):
            raise ValueError(f"soft labels must have shape [B, K] = [{batch}, {k}]; got {list(labels.shape)}")
        return
    if labels.shape != (batch,) or labels.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
        raise ValueError(f"labels must be integer [B] = [{batch}] or float [B, K]; "
                         f"got {list(labels.shape)} {labels.dtype}")
    if labels.device.type == "cpu":
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= k:
            raise ValueError(f"labels must lie in [0, {k - 1}] (num_classes={k}); got values in [{lo}, {hi}]")
    else:  # a host-side check would stall the GPU queue every step; assert on the device instead
        torch._assert_async(((labels >= 0) & (labels < k)).all(), f"labels must lie in [0, {k - 1}]")


class Mixer:
    """Shared machinery: argument checks, pairing, target mixing. Subclasses supply the pixel weights (Cutout, which
    takes nothing from another image, shares the checks and the draw/apply contract only).

    Args:
        alpha: lambda ~ Beta(alpha, alpha).
        prob: the chance that a sample (``elem``) or the batch (``batch``) is mixed.
        num_classes: the width of the soft targets; None: the dataset's, which the DataModule sets
            (:meth:`bind_classes`). A mixer used on its own needs it set.
        mode: ``elem``, a lambda (and box) per sample, or ``batch``, one for the whole batch.
        pairing: ``perm``, a random partner per sample, or ``roll``, its neighbour (the batch rolled by one).
    """

    def __init__(self, alpha: float, prob: float, num_classes: int | None, mode: Mode, pairing: Pairing) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha={alpha!r} is out of range: it must be a finite number > 0 (Beta(alpha, alpha))")
        self.alpha = float(alpha)
        self._set_common(prob, num_classes, mode)
        _check_choice("pairing", pairing, ("perm", "roll"))
        self.pairing = pairing

    def _set_common(self, prob: float, num_classes: int | None, mode: Mode) -> None:
        """Check and set the settings every batch augmentation has, mixing or not."""
        _check_unit("prob", prob)
        if num_classes is not None:
            _check_classes(num_classes)
        _check_choice("mode", mode, ("elem", "batch"))
        self.prob = float(prob)
        self.num_classes = num_classes
        self.mode = mode

    # the flag(s) that set num_classes in a config, for the fix of a refused one
    _classes_flags: tuple[str, ...] = ("data.mixer.init_args.num_classes",)

    def bind_classes(self, num_classes: int, data: str = "the data") -> Mixer:
        """This mixer for data of ``num_classes`` classes (``data`` names it in an error): itself when its
        ``num_classes`` is that already; a copy set to it when it is None (the mixer itself is left unset, as one
        instance, such as the DataModule's default, may serve several data sets). A different one is refused."""
        _check_classes(num_classes)
        if self.num_classes is None:
            bound = copy.deepcopy(self)  # no cached tensors: __getstate__ leaves them out
            bound._bind(num_classes)
            return bound
        if self.num_classes != num_classes:
            fix = " and ".join(f"{flag} {num_classes}" for flag in self._classes_flags)
            raise ValueError(f"data.mixer.num_classes={self.num_classes} does not match the {num_classes} classes of "
                             f"{data}; fix: {fix}, or leave {'it' if len(self._classes_flags) == 1 else 'them'} "
                             "null (the data's)")
        return self

    def _bind(self, num_classes: int) -> None:
        self.num_classes = num_classes

    _hidden_in_repr: tuple[str, ...] = ()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and k not in self._hidden_in_repr)
        return f"{type(self).__name__}({args})"

    def __getstate__(self) -> dict[str, Any]:
        """Pickle and copy the settings only: cached device tensors are rebuilt on first use."""
        return {k: v for k, v in vars(self).items() if k != "_cache"}

    # -- checks -------------------------------------------------------------------------------------
    def _check_inputs(self, images: Tensor, labels: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a 4-D floating tensor [B, C, H, W]; got {got}")
        self.check_labels(labels, images.shape[0], images.device)

    def check_labels(self, labels: Tensor, batch: int, device: torch.device) -> None:
        """Labels for a batch of ``batch`` images on ``device``: integer [B] in [0, K) or float [B, K]."""
        _check_label_batch(labels, batch, device, self.num_classes, type(self).__name__)

    # -- pieces subclasses share --------------------------------------------------------------------
    def _draws(self, n: int) -> int:
        return n if self.mode == "elem" else 1

    def _expand(self, t: Tensor, n: int) -> Tensor:
        """A batch-mode draw [1] repeated for the n samples (a real tensor, not a stride-0 view)."""
        return t.expand(n).contiguous() if self.mode == "batch" else t

    def _coin(self, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor | None:
        """The draw that decides which samples are mixed; None at ``prob`` 1, where the stream and the speed of
        the default setting do not pay for a coin."""
        return None if self.prob >= 1.0 else torch.rand(self._draws(n), device=device, generator=generator)

    def _active(self, coin: Tensor | None, n: int, device: torch.device) -> Tensor:
        """Which samples are mixed: each (elem) or the whole batch (batch) with probability ``prob``."""
        if coin is None:
            return torch.ones(n, dtype=torch.bool, device=device)
        return self._expand(coin < self.prob, n)

    def _partners(self, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        if self.pairing == "roll":
            return torch.arange(n, device=device).roll(1)
        return torch.randperm(n, device=device, generator=generator)

    # -- draw the randomness, then apply it ------------------------------------------------------------
    def draw(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Any]:
        """All of one call's random draws for a batch shaped like ``images``, as tensors on its device: the
        partner ``index`` and the subclass's own (lambdas, box centres, coins)."""
        n, _, height, width = images.shape
        index = self._partners(n, images.device, generator)
        return {"index": index, **self._draw(n, height, width, images.device, generator)}

    def _draw(self, n: int, height: int, width: int, device: torch.device,
              generator: torch.Generator | None) -> dict[str, Any]:
        raise NotImplementedError

    def weights(self, images: Tensor, draws: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """What the draws mean for these images, with no randomness. Returns ``(keep, lam, is_cutmix)``:

        keep: the weight of each sample's own pixels, in the images' dtype, broadcastable to them (1 outside a
            CutMix box and 0 inside it; lambda for MixUp; 1 where unmixed). The partner's weight is ``1 - keep``.
        lam: the weight of the sample's own label, [B].
        is_cutmix: bool [B], samples mixed by cut-and-paste.
        """
        raise NotImplementedError

    # -- the call -----------------------------------------------------------------------------------
    def mix(self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Mixed:
        """Mix a batch; returns new images (the input is untouched), float32 targets and what was done."""
        self._check_inputs(images, labels)
        return self.apply(images, labels, self.draw(images, generator))

    def apply(self, images: Tensor, labels: Tensor, draws: dict[str, Any]) -> Mixed:
        """Mix a batch with given draws: pure tensor arithmetic, with no randomness and no host reads, so that
        ``torch.compile`` can fuse it into a few kernels (``TrainTransform(compile=True)``)."""
        n, device, index = images.shape[0], images.device, draws["index"]
        keep, lam, is_cutmix = self.weights(images, draws)
        # Gather the partners into a fresh buffer and blend the own images into it in place: two passes over
        # the pixels and one allocation. lerp is exact at weight 0 and 1 (end - (end - start) * 0 there), so a
        # CutMix pixel is a bit-exact copy of the sample or of its partner; on a CPU a float lerp is several
        # times faster than torch.where with a broadcast bool mask, and on a GPU it is one kernel either way.
        mixed = images.index_select(0, index).lerp_(images, keep.to(images.dtype))
        lam32 = lam.to(torch.float32)
        if labels.is_floating_point():
            soft = labels.to(torch.float32)
            targets = lam32[:, None] * soft + (1.0 - lam32[:, None]) * soft.index_select(0, index)
        else:  # lam on the own label plus 1 - lam on the partner's: two scatters, no one-hot products
            own, other = labels.long()[:, None], labels.long().index_select(0, index)[:, None]
            targets = torch.zeros(n, self.num_classes, device=device).scatter_(1, own, lam32[:, None])
            targets.scatter_add_(1, other, (1.0 - lam32)[:, None])
        return Mixed(mixed, targets, index, lam32, is_cutmix)

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
        num_classes: number of classes K of the soft targets, at least 2; None (the default): the dataset's, set
            by the DataModule. A CutMix used on its own, outside a DataModule, needs it.
        mode: ``elem`` gives every sample its own box and lambda; ``batch`` one for the whole batch, as the
            paper's reference code does.
        minmax: optional (min, max) box side as fractions of the image side, drawn independently for height
            and width, box kept inside the image (timm's ``cutmix_minmax``); lambda is then the area left.
        correct_lam: relabel with the area actually kept after clipping the box to the image (the paper's
            Algorithm A1 does this), so targets match pixels exactly. Off: the sampled lambda.
        pairing: ``perm`` pairs each sample with a random permutation of the batch; ``roll`` with its neighbour.
    """

    def __init__(self, alpha: float = 1.0, prob: float = 1.0, num_classes: int | None = None, mode: Mode = "elem",
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

    def _constants(self, height: int, width: int, device: torch.device) -> tuple[Tensor, ...]:
        """Float32 constants on the device, made once rather than copied every call: the sizes, the minmax side
        ranges (all [2, 1], rows y and x) and pixel positions [max(H, W)]."""
        key = (height, width, str(device), self.minmax)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            lo_frac, hi_frac = self.minmax or (0.0, 0.0)
            side_lo = [int(height * lo_frac), int(width * lo_frac)]
            side_hi = [int(height * hi_frac), int(width * hi_frac)]
            cache[key] = (*(torch.tensor(v, dtype=torch.float32, device=device).view(2, 1) for v in
                            ([height, width], [height / 2, width / 2], side_lo,
                             [b - a for a, b in zip(side_lo, side_hi)])),
                          torch.arange(max(height, width), dtype=torch.float32, device=device))
        return cache[key]

    def _draw(self, n: int, height: int, width: int, device: torch.device,
              generator: torch.Generator | None) -> dict[str, Any]:
        m = self._draws(n)
        sizes = self._constants(height, width, device)[0]  # made here, outside any compiled apply
        if self.minmax is not None:  # timm's rand_bbox_minmax: two uniforms per axis, for the side and the start
            draws = {"u": torch.rand(2, 2, m, device=device, generator=generator)}
        else:  # the paper's Algorithm A1: lambda, and a box centre uniform over the pixels
            lam = sample_beta(self.alpha, m, device=device, generator=generator)
            draws = {"lam": lam, "centre": _uniform_centres(m, height, width, sizes, device, generator)}
        return {**draws, "coin": self._coin(n, device, generator)}

    def _bounds(self, draws: dict[str, Any], height: int, width: int, device: torch.device
                ) -> tuple[Tensor, Tensor, Tensor]:
        """The boxes as float32 [2, m] (rows: y, x) start and end, clipped to the image, and the sampled lambda [m].

        Both axes are computed and clipped together, in exact small-integer float32, so that a box costs a
        handful of tiny kernels: at CIFAR sizes the number of kernels, not their work, is the cost.
        """
        sizes, half_sizes, side_lo, span, _ = self._constants(height, width, device)
        if self.minmax is not None:  # sides uniform in [int(min*S), int(max*S)), every start position
            u = draws["u"]
            cut = torch.addcmul(side_lo, u[0], span).floor_()
            start = (sizes - cut + 1).mul_(u[1]).floor_()  # flush with either edge included
            lam = 1.0 - cut[0] * cut[1] / (height * width)  # with minmax, lambda is always the area left
            return start, start + cut, lam
        # side ratio sqrt(1 - lam) (Algorithm A1), the box clipped to the image
        lam, centre = draws["lam"], draws["centre"]
        half = torch.sqrt(1.0 - lam).mul(half_sizes).floor_()  # = int(S * sqrt(1 - lam)) // 2: floor(x / 2)
        # equals floor(floor(x) / 2), and halving a float32 is exact
        return (centre - half).clamp_(min=0), torch.minimum(centre + half, sizes), lam

    def weights(self, images: Tensor, draws: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        n, _, height, width = images.shape
        device, dtype = images.device, images.dtype
        m = self._draws(n)
        lo, hi, lam = self._bounds(draws, height, width, device)
        active = self._active(draws["coin"], n, device)
        # A pixel keeps its own value when its row or its column lies outside the box, so keep is the outer
        # maximum of two [m, H] and [m, W] indicators (computed together as one [2, m, max(H, W)] comparison):
        # one pass over m*H*W elements, a third of the images (m = 1 in batch mode: one [H, W] mask). It is
        # several times cheaper on a CPU than building and applying a bool [B, H, W] box mask.
        pos = self._constants(height, width, device)[-1]
        outside = (pos < lo[..., None]) | (pos >= hi[..., None])
        if self.prob < 1.0:  # an unmixed sample keeps every pixel
            outside[0] |= ~active[:m, None]
        outside = outside.to(dtype)
        keep = torch.maximum(outside[0, :, None, :height, None], outside[1, :, None, None, :width])
        if self.correct_lam or self.minmax is not None:
            extent = hi - lo
            lam = 1.0 - extent[0] * extent[1] / (height * width)
        lam = self._expand(lam, n)
        if self.prob < 1.0:
            lam = torch.where(active, lam, torch.ones_like(lam))
        return keep, lam, active


class MixUp(Mixer):
    """MixUp (Zhang et al. 2018): pixels and targets are the same convex combination, lambda ~ Beta(alpha, alpha).

    Args as for :class:`CutMix`: ``alpha`` > 0, ``prob`` in [0, 1], ``num_classes`` >= 2 or None (the dataset's,
    set by the DataModule; needed on its own), ``mode``
    ``elem`` (a lambda per sample) or ``batch`` (one per batch), ``pairing`` ``perm`` or ``roll``.
    """

    def __init__(self, alpha: float = 0.2, prob: float = 1.0, num_classes: int | None = None, mode: Mode = "elem",
                 pairing: Pairing = "perm") -> None:
        super().__init__(alpha, prob, num_classes, mode, pairing)

    def _draw(self, n: int, height: int, width: int, device: torch.device,
              generator: torch.Generator | None) -> dict[str, Any]:
        lam = sample_beta(self.alpha, self._draws(n), device=device, generator=generator)
        return {"lam": lam, "coin": self._coin(n, device, generator)}

    def weights(self, images: Tensor, draws: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        n, device = images.shape[0], images.device
        lam = self._expand(draws["lam"], n)
        lam = torch.where(self._active(draws["coin"], n, device), lam, torch.ones_like(lam))
        return lam.view(-1, 1, 1, 1).to(images.dtype), lam, torch.zeros(n, dtype=torch.bool, device=device)


class CutMixUp(Mixer):
    """CutMix or MixUp for each sample (``elem``) or batch (``batch``), as timm's ``Mixup`` with both on.

    Args:
        cutmix: the CutMix half (its alpha, minmax and correct_lam are used).
        mixup: the MixUp half (its alpha is used). The halves' ``num_classes`` must agree where both are set; one
            that is None takes the other's, and both None are the dataset's (set by the DataModule).
        switch_prob: probability of CutMix rather than MixUp for a mixed sample. In [0, 1].
        prob: probability that a sample (or the batch) is mixed at all. In [0, 1].
        mode: ``elem`` or ``batch``; overrides the halves' own modes.
        pairing: ``perm`` or ``roll``; overrides the halves' own pairing.
    """

    _hidden_in_repr = ("alpha",)  # the CutMix half's, shown with it (the MixUp half has its own)

    def __init__(self, cutmix: CutMix | None = None, mixup: MixUp | None = None, switch_prob: float = 0.5,
                 prob: float = 1.0, mode: Mode = "elem", pairing: Pairing = "perm") -> None:
        cutmix = CutMix() if cutmix is None else cutmix
        if not isinstance(cutmix, CutMix):
            raise ValueError(f"cutmix={cutmix!r} must be a CutMix (or null for the default CutMix())")
        mixup = MixUp(num_classes=cutmix.num_classes) if mixup is None else mixup
        if not isinstance(mixup, MixUp):
            raise ValueError(f"mixup={mixup!r} must be a MixUp (or null for the default MixUp())")
        if None not in (cutmix.num_classes, mixup.num_classes) and cutmix.num_classes != mixup.num_classes:
            raise ValueError(f"cutmix.num_classes={cutmix.num_classes} and mixup.num_classes="
                             f"{mixup.num_classes} must agree (or leave one null)")
        num_classes = cutmix.num_classes if cutmix.num_classes is not None else mixup.num_classes
        super().__init__(cutmix.alpha, prob, num_classes, mode, pairing)
        _check_unit("switch_prob", switch_prob)
        self.switch_prob = float(switch_prob)
        # The halves draw their boxes and lambdas in this mixer's mode; their own prob is superseded.
        self.cutmix, self.mixup = copy.copy(cutmix), copy.copy(mixup)
        for half in (self.cutmix, self.mixup):
            half.mode, half.pairing, half.prob, half.num_classes = mode, pairing, 1.0, num_classes

    _classes_flags = ("data.mixer.init_args.cutmix.init_args.num_classes",
                      "data.mixer.init_args.mixup.init_args.num_classes")

    def _bind(self, num_classes: int) -> None:
        for mixer in (self, self.cutmix, self.mixup):
            mixer.num_classes = num_classes

    def _draw(self, n: int, height: int, width: int, device: torch.device,
              generator: torch.Generator | None) -> dict[str, Any]:
        cut = self.cutmix._draw(n, height, width, device, generator)
        mix = self.mixup._draw(n, height, width, device, generator)
        switch = torch.rand(self._draws(n), device=device, generator=generator)
        return {"cutmix": cut, "mixup": mix, "switch": switch, "coin": self._coin(n, device, generator)}

    def weights(self, images: Tensor, draws: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        n, device = images.shape[0], images.device
        keep_c, lam_c, _ = self.cutmix.weights(images, draws["cutmix"])
        keep_m, lam_m, _ = self.mixup.weights(images, draws["mixup"])
        use_cut = self._expand(draws["switch"] < self.switch_prob, n)
        active = self._active(draws["coin"], n, device)
        keep = torch.where(use_cut.view(-1, 1, 1, 1), keep_c, keep_m)
        keep = torch.where(active.view(-1, 1, 1, 1), keep, torch.ones((), dtype=keep.dtype, device=device))
        lam = torch.where(active, torch.where(use_cut, lam_c, lam_m), torch.ones_like(lam_c))
        return keep, lam, use_cut & active


class Cutout(Mixer):
    """Cutout (DeVries & Taylor 2017, arXiv:1708.04552): a square hole per image, filled with zero after normalisation
    (the dataset mean); the hard labels are kept.

    It fills the ``data.mixer`` slot and keeps the mixers' contract (``draw`` then ``apply``, ``Mixed``), as the
    degenerate mix in which every image is its own partner: ``index`` is the identity, ``lam`` is 1, ``is_cutmix`` is
    False, and the targets are the one-hot labels (soft labels pass through unchanged).

    Args:
        size: side of the hole in pixels; the paper's is 16 for CIFAR-10 (8 for CIFAR-100). The centre is uniform over
            all pixels, so a hole near the border is clipped, and a size beyond the image is clipped the same way
            (from twice the image side on, every hole covers the whole image). At least 1.
        prob: probability that an image (``elem``) or the batch (``batch``) gets a hole; the paper's is 1. In [0, 1].
        num_classes: number of classes K of the one-hot targets, at least 2; None (the default): the dataset's, set
            by the DataModule. A Cutout used on its own needs it.
        mode: ``elem`` gives every image its own hole; ``batch`` one hole (and one coin) for the whole batch.
    """

    def __init__(self, size: int = 16, prob: float = 1.0, num_classes: int | None = None, mode: Mode = "elem") -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size={size!r} is out of range: it must be an integer >= 1, the side of the hole in "
                             "pixels (the paper's is 16 for CIFAR-10)")
        self.size = size
        self._set_common(prob, num_classes, mode)

    def _constants(self, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The sizes [[H], [W]] and pixel positions [max(H, W)] as float32 on the device, made once."""
        key = (height, width, str(device))
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = (torch.tensor([[height], [width]], dtype=torch.float32, device=device),
                          torch.arange(max(height, width), dtype=torch.float32, device=device))
        return cache[key]

    def _partners(self, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        return torch.arange(n, device=device)  # nothing comes from another image

    def _draw(self, n: int, height: int, width: int, device: torch.device,
              generator: torch.Generator | None) -> dict[str, Any]:
        sizes = self._constants(height, width, device)[0]
        centre = _uniform_centres(self._draws(n), height, width, sizes, device, generator)
        return {"centre": centre, "coin": self._coin(n, device, generator)}

    def hole(self, images: Tensor, draws: dict[str, Any]) -> Tensor:
        """The holes of these draws as bool [m, 1, H, W] (m = B in ``elem`` mode, 1 in ``batch``), False everywhere for
        an image without one; no randomness, no host reads."""
        n, _, height, width = images.shape
        m = self._draws(n)
        sizes, pos = self._constants(height, width, images.device)
        # The reference code (uoguelph-mlrg/Cutout, util/cutout.py) cuts [c - size//2, c + size//2) clipped to the
        # image; starting at c - size//2 and spanning `size` is that box for the even sizes it is used with, and
        # gives an odd size its full side rather than size - 1.
        start = draws["centre"] - (self.size // 2)
        lo, hi = start.clamp_min(0), torch.minimum(start + self.size, sizes)
        inside = (pos >= lo[..., None]) & (pos < hi[..., None])  # [2, m, max(H, W)]: rows y, x
        if self.prob < 1.0:  # an image without a hole: no row inside
            inside[0] &= self._active(draws["coin"], n, images.device)[:m, None]
        return inside[0, :, None, :height, None] & inside[1, :, None, None, :width]

    def weights(self, images: Tensor, draws: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """``keep`` is 0 in the hole and 1 elsewhere; where it is 0 the pixel becomes 0, not a partner's."""
        n, device = images.shape[0], images.device
        keep = (~self.hole(images, draws)).to(images.dtype)
        return keep, torch.ones(n, device=device), torch.zeros(n, dtype=torch.bool, device=device)

    def apply(self, images: Tensor, labels: Tensor, draws: dict[str, Any]) -> Mixed:
        """Cut the holes: pure tensor arithmetic, no randomness, no host reads (``torch.compile`` fuses it)."""
        n, device = images.shape[0], images.device
        # Zero after normalisation is the dataset mean (the paper). A fill rather than a product with the mask, so a
        # hole is exactly +0.0 (x * 0 is -0.0 for negative x, and NaN for a non-finite one).
        holed = images.masked_fill(self.hole(images, draws), 0.0)
        if labels.is_floating_point():
            targets = labels.to(torch.float32, copy=True)
        else:  # one-hot by a scatter: F.one_hot reads the labels' range back to the host on a CPU
            targets = torch.zeros(n, self.num_classes, device=device).scatter_(1, labels.long()[:, None], 1.0)
        return Mixed(holed, targets, draws["index"], torch.ones(n, device=device),
                     torch.zeros(n, dtype=torch.bool, device=device))


def random_crop_flip(images: Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> Tensor:
    """The standard CIFAR augmentation for a whole batch: zero-pad, random crop back, random h-flip.

    One gather does both, with per-sample offsets, so it costs the same on any device and any dtype
    (uint8 in the data path, so that the gather moves a quarter of the bytes of float32).
    """
    check_image_batch(images)
    if padding < 0:
        raise ValueError(f"padding={padding!r} is out of range: it must be >= 0")
    return crop_flip(images, padding, crop_flip_draw(len(images), padding, flip, images.device, generator))


def check_image_batch(images: Tensor) -> None:
    """A batch of images is 4-D, [B, C, H, W]."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W]; got shape {list(images.shape)}")


def crop_flip_draw(n: int, padding: int, flip: bool, device: torch.device,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The random part of :func:`random_crop_flip`: per-sample offsets dy, dx [n, 1] and flips [n, 1] (or None)."""
    dy = torch.randint(2 * padding + 1, (n, 1), device=device, generator=generator)
    dx = torch.randint(2 * padding + 1, (n, 1), device=device, generator=generator)
    flipped = torch.rand(n, 1, device=device, generator=generator) < 0.5 if flip else None
    return dy, dx, flipped


def crop_flip(images: Tensor, padding: int, draws: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
    """The arithmetic part of :func:`random_crop_flip` for given draws: no randomness, no host reads."""
    dy, dx, flipped = draws
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4) if padding else images
    iy = dy + torch.arange(h, device=images.device)
    ix = dx + torch.arange(w, device=images.device)
    if flipped is not None:
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

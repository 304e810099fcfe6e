"""RandAugment (Cubuk et al. 2020, arXiv:1909.13719) per image, batched on the device that holds the batch.

Each image draws its own ``num_ops`` operations from torchvision's list (identity, shear x/y, translate x/y, rotate,
brightness, color, contrast, sharpness, posterize, solarize, autocontrast, equalize), each with its own sign and,
optionally, its own magnitude. Applying a whole batch is three branches per round, each the identity for the images
that did not draw one of its operations, so no Python loop over images and no host-device synchronisation:

- the five geometric operations are one ``grid_sample`` with a per-image affine matrix (nearest, zero fill);
- brightness, color, contrast and sharpness blend each image with its own degenerate image by its own factor;
- posterize, solarize, autocontrast and equalize are a per-image, per-channel 256-entry lookup table.

The operations and magnitudes are torchvision's ``v2.RandAugment`` (31 bins, magnitude 9 by default), and each
operation matches ``torchvision.transforms.v2.functional`` on the same image and magnitude, to the bit on a CPU
(``tests/training/test_randaugment.py``). uint8 batches are augmented as they are; float batches in [0, 1] are
quantised to 8 bits for the operations and returned as float. There is no Lightning import here.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OPS", "RandAugment"]

# torchvision's order; the index of an operation is what the generator draws
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_BLEND = ("Brightness", "Color", "Contrast", "Sharpness")
_LOOKUP = ("Identity", "Posterize", "Solarize", "AutoContrast", "Equalize")
_SIGNED = _GEOMETRIC + _BLEND


def magnitudes(op: str, bins: int, height: int, width: int) -> Tensor:
    """The magnitude of ``op`` at each of ``bins`` levels, as torchvision's RandAugment defines them (in float32, as
    there, so the values agree to the bit; returned as float64)."""
    linear = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * width,
              "TranslateY": 150.0 / 331.0 * height, "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9,
              "Contrast": 0.9, "Sharpness": 0.9}
    if op in linear:
        return torch.linspace(0.0, linear[op], bins, dtype=torch.float32).double()
    if op == "Posterize":
        return (8 - (torch.arange(bins) / ((bins - 1) / 4))).round().double()
    if op == "Solarize":
        return torch.linspace(1.0, 0.0, bins, dtype=torch.float32).double()
    return torch.zeros(bins, dtype=torch.float64)  # Identity, AutoContrast, Equalize take none


class RandAugment:
    """RandAugment with an operation, sign and magnitude drawn per image.

    Args:
        num_ops: operations applied to each image in turn (N in the paper), >= 0.
        magnitude: the magnitude bin (M in the paper), in [0, num_magnitude_bins - 1].
        num_magnitude_bins: number of magnitude levels (31 in torchvision), >= 2.
        random_magnitude: draw each image's bin uniformly from [0, magnitude] for each operation instead of using
            ``magnitude`` itself.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31,
                 random_magnitude: bool = False) -> None:
        for name, value, low in (("num_ops", num_ops, 0), ("num_magnitude_bins", num_magnitude_bins, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.randaugment.{name}={value!r} is out of range: it must be an integer >= {low}")
        if isinstance(magnitude, bool) or not isinstance(magnitude, int) or not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"data.randaugment.magnitude={magnitude!r} is out of range: it must be an integer in "
                             f"[0, {num_magnitude_bins - 1}] (num_magnitude_bins={num_magnitude_bins})")
        self.num_ops, self.magnitude = num_ops, magnitude
        self.num_magnitude_bins, self.random_magnitude = num_magnitude_bins, bool(random_magnitude)
        self._tables: dict[tuple[int, int, str], Tensor] = {}

    def __repr__(self) -> str:
        return (f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
                f"num_magnitude_bins={self.num_magnitude_bins}, random_magnitude={self.random_magnitude})")

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "_tables"} | {"_tables": {}}

    def _table(self, height: int, width: int, device: torch.device) -> Tensor:
        """[len(OPS), bins] magnitudes, float64, on the device (made once per size and device)."""
        key = (height, width, str(device))
        if key not in self._tables:
            rows = [magnitudes(op, self.num_magnitude_bins, height, width) for op in OPS]
            self._tables[key] = torch.stack(rows).to(device)
        return self._tables[key]

    # -- drawing the randomness, then applying it (as torchvision's v2 transforms do) ------------------------------
    def draw(self, n: int, height: int, width: int, device: torch.device,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """For each round and image: the operation index [num_ops, n] (int64) and its signed magnitude (float64)."""
        ops = torch.randint(len(OPS), (self.num_ops, n), device=device, generator=generator)
        if self.random_magnitude:
            bins = torch.randint(self.magnitude + 1, (self.num_ops, n), device=device, generator=generator)
        else:
            bins = torch.full((self.num_ops, n), self.magnitude, device=device)
        flip = torch.rand(self.num_ops, n, device=device, generator=generator) <= 0.5
        signed = _is(ops, _SIGNED)
        mags = self._table(height, width, device)[ops, bins]
        return ops, torch.where(flip & signed, -mags, mags)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, 1 or 3, H, W]; got shape {list(images.shape)}")
        n, _, height, width = images.shape
        if n == 0 or self.num_ops == 0:
            return images
        ops, mags = self.draw(n, height, width, images.device, generator)
        return self.apply(images, ops, mags)

    def apply(self, images: Tensor, ops: Tensor, mags: Tensor) -> Tensor:
        """Apply drawn operations ([rounds, n] indices and magnitudes) to a uint8 or float [0, 1] batch."""
        is_float = images.is_floating_point()
        x = images.mul(255).round_().clamp_(0, 255).to(torch.uint8) if is_float else images
        if x.device.type == "cpu":
            x = x.clone()  # the CPU path writes the augmented images back in place
        for op, mag in zip(ops, mags):
            for names, branch in ((_GEOMETRIC, geometric), (_BLEND, blend), (_LOOKUP, lookup)):
                x = _on_drawn(x, op, mag, names, branch)
        return x.to(images.dtype).div_(255) if is_float else x


def _on_drawn(x: Tensor, op: Tensor, mag: Tensor, names: tuple[str, ...], branch) -> Tensor:
    """Apply a branch. On a GPU to the whole batch (it is the identity for the images that drew none of its
    operations), since picking the images out would make the host wait for the device; on a CPU, where that costs
    nothing, to the images that drew one of them only."""
    if x.device.type != "cpu":
        return branch(x, op, mag)
    idx = _is(op, names).nonzero().squeeze(1)
    if len(idx):
        x.index_copy_(0, idx, branch(x[idx], op[idx], mag[idx]))
    return x


def _needed(op: Tensor, name: str) -> bool:
    """Whether a branch must compute ``name``'s part: always on a GPU (no host read), on a CPU only when drawn."""
    return op.device.type != "cpu" or bool((op == OPS.index(name)).any())


def _is(op: Tensor, names: tuple[str, ...]) -> Tensor:
    """Whether each drawn operation is one of ``names``: comparisons with scalars, so no tensor is copied from host
    memory (a copy that would make the host wait for a GPU every batch)."""
    mask = op == OPS.index(names[0])
    for name in names[1:]:
        mask |= op == OPS.index(name)
    return mask


def _index(name: str) -> int:
    return OPS.index(name)


# -- the geometric operations: one grid_sample with a per-image inverse affine matrix ----------------------------
def inverse_affine(op: Tensor, mag: Tensor, height: int, width: int) -> Tensor:
    """[n, 2, 3] inverse affine matrices (float64) of torchvision's ``affine``/``rotate`` as RandAugment calls them;
    the identity for non-geometric operations."""
    zero = torch.zeros_like(mag)
    angle = torch.where(op == _index("Rotate"), -mag, zero)  # rotate(a) is affine(-a)
    shear_x = torch.where(op == _index("ShearX"), torch.rad2deg(torch.atan(mag)), zero)
    shear_y = torch.where(op == _index("ShearY"), torch.rad2deg(torch.atan(mag)), zero)
    tx = torch.where(op == _index("TranslateX"), mag.trunc(), zero)  # int(magnitude)
    ty = torch.where(op == _index("TranslateY"), mag.trunc(), zero)
    sheared = _is(op, ("ShearX", "ShearY"))  # the shears are about the top-left corner (center=[0, 0])
    cx = torch.where(sheared, zero - width * 0.5, zero)
    cy = torch.where(sheared, zero - height * 0.5, zero)
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return torch.stack([m0, m1, m2, m3, m4, m5], -1).view(-1, 2, 3)


def geometric(x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
    n, _, height, width = x.shape
    theta = inverse_affine(op, mag, height, width).to(torch.float32)
    # torchvision's grid: pixel centres relative to the image centre, mapped by theta, then normalised by the size
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=x.device)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=x.device)
    base = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width),
                        torch.ones(height, width, device=x.device)], -1).view(1, height * width, 3)
    rescaled = theta.transpose(1, 2).contiguous()  # divided by the half sizes as scalars: no host-to-device copy
    rescaled[..., 0] /= 0.5 * width
    rescaled[..., 1] /= 0.5 * height
    grid = base.expand(n, -1, -1).bmm(rescaled).view(n, height, width, 2)
    warped = F.grid_sample(x.to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return warped.round_().to(x.dtype)


# -- brightness, color, contrast, sharpness: blend with a degenerate image --------------------------------------
def _grayscale(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x.to(torch.float32)
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1).floor_()


def _sharpness_degenerate(x: Tensor) -> Tensor:
    """torchvision's smoothed image: the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded, on the interior.
    Summed here as integers (exact in float32) and divided once: the exact value (S / 13 for an integer S) is never
    within 1/26 of a rounding edge, so this rounds as torchvision's convolution does, without a convolution."""
    out = x.to(torch.float32)
    h, w = x.shape[-2:]
    total = 4 * out[..., 1:-1, 1:-1]
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            total = total + out[..., dy:dy + h - 2, dx:dx + w - 2]
    out = out.clone()
    out[..., 1:-1, 1:-1] = total.div_(13).round_()
    return out


def blend(x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
    """``x * f + degenerate * (1 - f)`` with f = 1 + magnitude, as torchvision's ``_blend``; x where no blend op."""
    n, _, height, width = x.shape
    view = (n, 1, 1, 1)
    is_blend = _is(op, _BLEND)
    ratio = torch.where(is_blend, 1.0 + mag, torch.ones_like(mag))
    r32, rest32 = ratio.to(torch.float32).view(view), (1.0 - ratio).to(torch.float32).view(view)
    xf = x.to(torch.float32)
    degenerate = torch.zeros_like(xf)  # brightness: blend with black
    if _needed(op, "Color") or _needed(op, "Contrast"):
        gray = _grayscale(x)
        degenerate = torch.where((op == _index("Color")).view(view), gray.expand_as(xf), degenerate)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        degenerate = torch.where((op == _index("Contrast")).view(view), mean.expand_as(xf), degenerate)
    sharp = (op == _index("Sharpness")).view(view)
    if height > 2 and width > 2 and _needed(op, "Sharpness"):
        degenerate = torch.where(sharp, _sharpness_degenerate(x), degenerate)
    # torchvision's x.mul(f).add_(degenerate, alpha=1 - f) rounds once after the multiply-add (a fused kernel);
    # float64 holds the product exactly, so one rounding to float32 gives the same values
    out = (xf.mul(r32).double() + degenerate.double() * rest32.double()).float()
    # torchvision blends sharpness as x + (1 - f) * (blurred - x): the same value, rounded differently
    out = torch.where(sharp, xf + rest32 * (degenerate - xf), out).clamp_(0, 255).to(x.dtype)
    # sharpness leaves the border alone (torchvision blends the interior only); other images keep their pixels
    border = torch.ones(1, 1, height, width, dtype=torch.bool, device=x.device)
    border[..., 1:-1, 1:-1] = False
    keep = ~is_blend.view(view) | (sharp & border) | (sharp & (height <= 2 or width <= 2))
    return torch.where(keep, x, out)


# -- posterize, solarize, autocontrast, equalize: a lookup table per image and channel ---------------------------
def _equalize_lut(x: Tensor) -> Tensor:
    """[n, C, 256] tables of torchvision's ``equalize`` (PIL's scheme); the identity where it leaves an image alone."""
    n, c = x.shape[:2]
    flat = x.flatten(2).long()
    hist = torch.zeros(n, c, 256, dtype=torch.int32, device=x.device)
    hist.scatter_add_(-1, flat, torch.ones(1, dtype=torch.int32, device=x.device).expand_as(flat))
    cum = hist.cumsum(-1)
    last = cum.argmax(-1, keepdim=True)
    step = (flat.shape[-1] - hist.gather(-1, last)).div(255, rounding_mode="floor")
    lut = (cum[..., :-1] + step // 2).div(step.clamp(min=1), rounding_mode="floor").clamp(0, 255)
    lut = torch.cat([torch.zeros(n, c, 1, dtype=lut.dtype, device=x.device), lut], -1)
    identity = torch.arange(256, device=x.device).expand(n, c, 256)
    return torch.where(step != 0, lut, identity)


def _autocontrast_lut(x: Tensor) -> Tensor:
    lo = x.amin(dim=(2, 3)).to(torch.float32)[..., None]
    hi = x.amax(dim=(2, 3)).to(torch.float32)[..., None]
    flat = hi == lo
    inv_scale = torch.where(flat, torch.ones_like(hi), (hi - lo) * (1.0 / 255))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    v = torch.arange(256, dtype=torch.float32, device=x.device)
    return ((v - lo) / inv_scale).clamp(0, 255).to(torch.uint8).long()


def lookup(x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
    n, c = x.shape[:2]
    view = (n, 1, 1)
    v = torch.arange(256, device=x.device).expand(n, c, 256)
    bits = torch.where(op == _index("Posterize"), mag, torch.full_like(mag, 8)).long().clamp(0, 8).view(view)
    posterize = v & (((1 << bits) - 1) << (8 - bits))
    threshold = torch.where(op == _index("Solarize"), 255.0 * mag, torch.full_like(mag, 256.0)).view(view)
    lut = torch.where(v >= threshold, 255 - v, posterize)  # bits 8 and threshold 256 change nothing
    if _needed(op, "AutoContrast"):
        lut = torch.where((op == _index("AutoContrast")).view(view), _autocontrast_lut(x), lut)
    if _needed(op, "Equalize"):
        lut = torch.where((op == _index("Equalize")).view(view), _equalize_lut(x), lut)
    flat = x.flatten(2).long()
    return lut.gather(-1, flat).to(x.dtype).view_as(x)

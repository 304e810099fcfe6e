"""Pictures for people: a captioned grid of mixed training images (TensorBoard and scripts share it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Standardised float images -> uint8 [0, 255], for display."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)


def captioned_grid(images: Tensor, captions: Sequence[str], columns: int = 8, scale: int = 3) -> np.ndarray:
    """uint8 [N, 3, H, W] images -> one uint8 HWC array, each tile scaled up and captioned below."""
    n, _, h, w = images.shape
    font = ImageFont.load_default()
    line = 11
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    tile_w, tile_h = w * scale, h * scale + line * lines + 4
    rows = (n + columns - 1) // columns
    canvas = Image.new("RGB", (columns * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        x, y = (i % columns) * tile_w, (i // columns) * tile_h
        tile = Image.fromarray(pixels[i]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (x, y))
        draw.multiline_text((x + 2, y + h * scale + 2), captions[i], fill="black", font=font, spacing=1)
    return np.asarray(canvas)


def mix_captions(labels: Tensor, partner: Tensor, lam: Tensor, classes: Sequence[str]) -> list[str]:
    """'cat 0.63\\n+dog 0.37' per sample: the two classes and the weight of each in the target."""
    out = []
    for a, b, l in zip(labels.tolist(), partner.tolist(), lam.tolist()):
        if l >= 1.0:
            out.append(f"{classes[a][:9]} 1.00\n")
        else:
            out.append(f"{classes[a][:9]} {l:.2f}\n+{classes[b][:8]} {1 - l:.2f}")
    return out

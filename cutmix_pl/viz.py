"""Pictures for people: a captioned grid of mixed training images and the confusion-matrix image (TensorBoard and
scripts share them)."""

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


def _text_width(text: str, font: ImageFont.ImageFont) -> int:
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=font, spacing=1)
    return int(right - left)


def captioned_grid(images: Tensor, captions: Sequence[str], columns: int = 8, scale: int = 3) -> np.ndarray:
    """uint8 [N, 3, H, W] images -> one uint8 HWC array, each tile scaled up and captioned below in full: tiles
    widen to the longest caption, so no class name is cut (CIFAR-100 has ``aquarium_fish``)."""
    n, _, h, w = images.shape
    font = ImageFont.load_default()
    line = 11
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    tile_w = max([w * scale] + [_text_width(c, font) + 6 for c in captions])
    tile_h = h * scale + line * lines + 4
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
    """'cat 0.63\\n+dog 0.37' per sample: each class the target gives weight, with that weight. A second class is
    named only when it has weight as printed (at least 0.005) and differs from the first; else 'cat 1.00'."""
    out = []
    for a, b, l in zip(labels.tolist(), partner.tolist(), lam.tolist()):
        if a == b or 1 - l < 0.005:
            out.append(f"{classes[a]} 1.00\n")
        else:
            out.append(f"{classes[a]} {l:.2f}\n+{classes[b]} {1 - l:.2f}")
    return out


def confusion_image(matrix: Tensor, classes: Sequence[str], cell: int = 34) -> np.ndarray:
    """A confusion matrix (rows: true class, columns: predicted) as a captioned heat map, uint8 HWC.

    Cells are shaded by the row-normalised rate and show the count, so rare and common classes read alike. Rows carry
    each class's index and full name, columns the index only, so names of any length stay readable.
    """
    counts = matrix.detach().cpu().to(torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    k = len(classes)
    font = ImageFont.load_default()
    rows = [f"{i} {name}" for i, name in enumerate(classes)]
    left, top = max(_text_width(r, font) for r in rows) + 8, 16
    legend = "rows: true class, columns: predicted (class index)"
    canvas = Image.new("RGB", (max(left + k * cell, _text_width(legend, font) + left + 4), top + k * cell + 14),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for j, row in enumerate(rows):
        draw.text((left + j * cell + 2, 2), str(j), fill="black", font=font)
        draw.text((2, top + j * cell + cell // 2 - 5), row, fill="black", font=font)
    for i in range(k):
        for j in range(k):
            r = float(rates[i, j])
            shade = int(255 * (1 - r))
            x, y = left + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            draw.text((x + 3, y + cell // 2 - 5), f"{int(counts[i, j])}", fill="white" if r > 0.5 else "black",
                      font=font)
    draw.text((left, top + k * cell + 2), legend, fill="black", font=font)
    return np.asarray(canvas)

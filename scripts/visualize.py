"""Pictures: a grid of CutMix-ed training images, and class activation maps of checkpoints side by side.

    python scripts/visualize.py grid --data-dir data --out cutmix_grid.png
    python scripts/visualize.py cam --data-dir data --out cam.png \\
        --ckpt cutmix=runs/cutmix/version_0/checkpoints/last.ckpt \\
        --ckpt baseline=runs/baseline/version_0/checkpoints/last.ckpt

CAM (Zhou et al. 2016): for a ResNet with global average pooling, the map of class c is the last stage's
features weighted by the head's weights for c, as the CutMix paper uses for its localisation figures (Fig. 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from cutmix_pl import cifar
from cutmix_pl.augment import CutMix
from cutmix_pl.data import CIFAR10DataModule
from cutmix_pl.module import ImageClassifier
from cutmix_pl.viz import captioned_grid, denormalize, mix_captions


def grid(args: argparse.Namespace) -> Path:
    dm = CIFAR10DataModule(args.data_dir, download=False, val_size=0, mixer=CutMix(alpha=1.0, prob=1.0))
    train = dm.split("train")
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(train.labels), generator=gen)[: args.n]
    batch = dm.transform(train.images[idx], train.labels[idx], 0, gen)
    images = denormalize(batch.images, cifar.MEAN, cifar.STD)
    picture = captioned_grid(images, mix_captions(batch.labels, batch.partner, batch.lam, cifar.CLASSES))
    Image.fromarray(picture).save(args.out)
    return args.out


def _heat(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8, a blue-green-yellow-red ramp (no colormap library needed)."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 128], [0, 160, 255], [80, 220, 80], [255, 220, 0], [220, 0, 0]], dtype=np.float64)
    pos = v * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = pos - lo
    return (stops[lo[..., 0]] * (1 - frac) + stops[lo[..., 0] + 1] * frac).astype(np.uint8)


@torch.no_grad()
def class_activation_maps(model: ImageClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: CAM of the predicted class upsampled to the image size in [0, 1], the class, its probability."""
    net = model.net
    feats = net.features(images)  # [B, C, h, w]
    probs = net.fc(feats.mean((2, 3))).softmax(-1)
    pred = probs.argmax(-1)
    cams = torch.einsum("bchw,bc->bhw", feats, net.fc.weight[pred])
    cams = F.interpolate(cams[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo, hi = cams.amin((1, 2), keepdim=True), cams.amax((1, 2), keepdim=True)
    return (cams - lo) / (hi - lo).clamp_min(1e-8), pred, probs.gather(1, pred[:, None])[:, 0]


def cam(args: argparse.Namespace) -> Path:
    models = {}
    for spec in args.ckpt:
        name, _, path = spec.partition("=")
        models[name] = ImageClassifier.load_from_checkpoint(path or name, map_location="cpu").eval()
    dm = CIFAR10DataModule(args.data_dir, download=False, val_size=0)
    test = dm.split("test")
    idx = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    raw, labels = test.images[idx], test.labels[idx]
    x = dm.transform.normalize(raw)
    scale, pad, font = 4, 14, ImageFont.load_default()
    side = 32 * scale
    columns = ["image", *models]
    canvas = Image.new("RGB", (len(columns) * (side + 4), pad + len(idx) * (side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns):
        draw.text((c * (side + 4) + 2, 1), title, fill="black", font=font)
    pixels = raw.permute(0, 2, 3, 1).numpy()
    big = lambda a: np.asarray(Image.fromarray(a).resize((side, side), Image.BILINEAR))  # noqa: E731
    for r in range(len(idx)):
        y = pad + r * (side + pad)
        canvas.paste(Image.fromarray(big(pixels[r])), (0, y))
        draw.text((2, y + side), f"true: {cifar.CLASSES[labels[r]]}", fill="black", font=font)
    for c, (name, model) in enumerate(models.items(), start=1):
        maps, pred, conf = class_activation_maps(model, x)
        for r in range(len(idx)):
            y = pad + r * (side + pad)
            overlay = 0.5 * big(pixels[r]).astype(np.float64) + 0.5 * big(_heat(maps[r].numpy()))
            canvas.paste(Image.fromarray(overlay.astype(np.uint8)), (c * (side + 4), y))
            draw.text((c * (side + 4) + 2, y + side), f"{cifar.CLASSES[pred[r]]} {conf[r]:.2f}",
                      fill="darkgreen" if pred[r] == labels[r] else "red", font=font)
    canvas.save(args.out)
    return args.out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grid", help="a captioned grid of CutMix-ed training images")
    g.add_argument("--n", type=int, default=32)
    c = sub.add_parser("cam", help="class activation maps of checkpoints on test images")
    c.add_argument("--ckpt", action="append", required=True, help="NAME=PATH, once per checkpoint")
    c.add_argument("--n", type=int, default=8)
    for s in (g, c):
        s.add_argument("--data-dir", type=Path, default=Path("data"))
        s.add_argument("--out", type=Path, required=True)
        s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = grid(args) if args.what == "grid" else cam(args)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()

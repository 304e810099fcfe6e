"""Robustness of finished runs on the CIFAR-10 test set: occlusion and in-between-class inputs, as in Section 4 of
the CutMix paper (Yun et al. 2019, "Robustness and uncertainty").

    python scripts/robustness.py --data-dir data --out robustness runs/cutmix/version_0 runs/baseline/version_0
    python scripts/robustness.py --out robustness "CutMix + RandAugment=runs/randaugment/version_0" ...

A RUN is a run folder (``runs/<name>/version_N``; its ``checkpoints/last.ckpt`` is evaluated) or a .ckpt file in
a run folder's ``checkpoints/``. The run must have finished: its last.ckpt holds the end its config.yaml asks for.
Its *method*, the line it joins, is the class of its config's ``data.mixer`` (the last part of the class path:
CutMix, MixUp, Cutout, ...; ``none`` when null), or NAME when given as NAME=RUN; its seed is its ``seed_everything``.
The runs of one method (its seeds) make one line in each plot, their mean; the CSVs keep one row per run.

The tests, on all the test images (``--images N``: the first N, for a quick look), normalised as for testing (per
channel, ``cifar.MEAN``/``STD``), the network in eval mode in float32 without test-time augmentation. Sizes s are
0, 4, ..., 28 pixels of the 32 x 32 image:

- centre occlusion: the centred s x s square (rows and columns 16 - s/2 to 16 + s/2 - 1) is set to 0 after
  normalisation (the training images' mean colour), in every channel. Top-1 accuracy.
- boundary occlusion: every pixel outside the centred (32 - s) x (32 - s) square, a frame s/2 pixels wide on each
  side, is set to 0 after normalisation: s = 0 is the clean image, s = 28 keeps the centre 4 x 4. The paper keeps a
  centre hole and zeroes the boundary around it; its hole size is 32 - s here, so that in both tests the occluded
  area grows with s. Top-1 accuracy.
- in-between-class inputs: the pairs (i, perm[i]) of test images, perm a permutation seeded by ``--seed``, pairs of
  equal labels left out (about 9,000 pairs of CIFAR-10's 10,000 images), each mixed with lambda 0.5 by MixUp (the
  average of the two normalised images) and by CutMix (columns 0-15 of image i and columns 16-31 of image perm[i]:
  a fixed box of exactly half the area at the same place in both, so nothing random but the pairing). Value: the
  fraction of the pairs whose two top predicted classes are the pair's two classes, in either order.

Outputs in ``--out``: ``occlusion_centre.csv`` and ``occlusion_boundary.csv`` (method, seed, run, checkpoint, size,
acc, images: a row per run and size), ``in_between.csv`` (method, seed, run, checkpoint, mix, top2_both, pairs: a
row per run and mix), and a PNG per test, one line per method (the mean over its runs; needs matplotlib, the
project's ``plots`` extra); the means are printed as markdown tables. Each file is written whole (a temporary file
renamed) once every run is evaluated; a bad RUN (missing, without its checkpoint or config, unfinished, unreadable,
trained on other data than CIFAR-10) ends the command in one line before anything is evaluated or written.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import events
from cutmix_pl import cifar, runs
from cutmix_pl.runs import disk, rules
from cutmix_pl.augment import normalize
from cutmix_pl.files import atomic_write
from cutmix_pl.module import ImageClassifier

SIDE = 32  # CIFAR-10 images are SIDE x SIDE
SIZES = tuple(range(0, 29, 4))  # occluded sizes in pixels
MIXES = ("mixup", "cutmix")
MIX_NAMES = {"mixup": "MixUp", "cutmix": "CutMix"}
OCCLUSIONS = ("centre", "boundary")
OCCLUSION_COLUMNS = ("method", "seed", "run", "checkpoint", "size", "acc", "images")
IN_BETWEEN_COLUMNS = ("method", "seed", "run", "checkpoint", "mix", "top2_both", "pairs")
# Network classes rebuilt from a checkpoint's record: a class named by a file is code that importing it would run.
TRUSTED_NETS = ("cutmix_pl.", "torchvision.models.")


class Refused(Exception):
    """A RUN or setting this command cannot use; the message says why and how to fix it, on one line."""


def fail(message: str) -> None:
    print(f"robustness.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        fail(f"{message}; fix: see python scripts/robustness.py --help")


# -- the inputs ----------------------------------------------------------------------------------------------
def centre_mask(size: int, side: int = SIDE) -> Tensor:
    """bool [side, side], True on the centred size x size square (rows and columns (side - size) / 2 on)."""
    if size % 2 or side % 2 or not 0 <= size <= side:
        raise ValueError(f"size {size} must be even and within [0, {side}]")
    inside = torch.zeros(side, dtype=torch.bool)
    inside[(side - size) // 2:(side + size) // 2] = True
    return inside[:, None] & inside[None, :]


def occlusion_mask(kind: str, size: int, side: int = SIDE) -> Tensor:
    """bool [side, side], True where the test of ``kind`` sets pixels to 0: the centred size x size square
    (``centre``), or all but the centred (side - size) x (side - size) square (``boundary``)."""
    if kind == "centre":
        return centre_mask(size, side)
    if kind == "boundary":
        return ~centre_mask(side - size, side)
    raise ValueError(f"unknown occlusion {kind!r}: choose one of {', '.join(OCCLUSIONS)}")


def occlude(images: Tensor, mask: Tensor) -> Tensor:
    """Normalised images [B, C, H, W] with the pixels of ``mask`` [H, W] set to 0 in every channel (a new tensor)."""
    return images.masked_fill(mask.to(images.device), 0.0)


def pairs(labels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """The in-between pairs: indices (i, perm[i]) for a permutation perm seeded by ``seed``, pairs of equal labels
    left out; in index order of i."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    keep = labels != labels[perm]
    return torch.arange(len(labels))[keep], perm[keep]


def mix(first: Tensor, second: Tensor, how: str) -> Tensor:
    """Two batches of normalised images mixed with lambda 0.5: ``mixup``, their average; ``cutmix``, the left half
    of the columns from ``first`` and the right half from ``second``."""
    if how == "mixup":
        return (first + second) / 2
    if how == "cutmix":
        half = first.shape[-1] // 2
        return torch.cat([first[..., :half], second[..., half:]], dim=-1)
    raise ValueError(f"unknown mix {how!r}: choose one of {', '.join(MIXES)}")


def top2_both(logits: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """bool [B]: whether the two top classes of each row of ``logits`` are the classes ``first`` and ``second``
    (which differ), in either order."""
    top = logits.topk(2, dim=-1).indices
    return (top == first[:, None]).any(-1) & (top == second[:, None]).any(-1)


# -- the runs ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    method: str
    seed: int | None
    folder: Path
    ckpt: Path
    model: ImageClassifier = field(repr=False)


def method_of(config: dict[str, Any]) -> str:
    """The class of the config's ``data.mixer``, the last part of its class path (it is not imported); ``none``."""
    mixer = (config.get("data") or {}).get("mixer")
    if mixer is None:
        return "none"
    path = mixer.get("class_path") if isinstance(mixer, dict) else mixer
    return str(path).rpartition(".")[2] or "none"


def _split_name(text: str) -> tuple[str | None, Path]:
    """NAME=RUN, or RUN alone (a path holding '=' that exists is a RUN)."""
    name, sep, rest = text.partition("=")
    if sep and name and not Path(text).exists():
        return name, Path(rest)
    return None, Path(text)


def find_run(text: str) -> tuple[str | None, Path, Path, dict[str, Any]]:
    """(NAME or None, run folder, checkpoint, saved config) of a RUN argument; Refused unless the run finished."""
    name, path = _split_name(text)
    path = path.absolute()
    if path.is_dir():
        folder, ckpt = path, path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise Refused(f"{path} holds no checkpoints/last.ckpt; fix: give the folder of a fit that saved one "
                          "(runs/<name>/version_N) or a .ckpt file in it")
    elif path.is_file():
        folder, ckpt = disk.run_of_checkpoint(path), path
    else:
        raise Refused(f"{path} is neither a run folder nor a checkpoint file; fix: give runs/<name>/version_N or a "
                      ".ckpt file in its checkpoints/")
    try:
        config = disk.saved_config(folder)
    except ValueError as err:
        raise Refused(f"{err}; fix: give a run folder made by python -m cutmix_pl fit") from None
    if config is None:
        raise Refused(f"{folder} holds no config.yaml, so its method and its length are unknown; fix: give a run "
                      "folder made by python -m cutmix_pl fit, or a .ckpt file in its checkpoints/")
    last = folder / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise Refused(f"{folder} holds no checkpoints/last.ckpt, so whether it finished is unknown; fix: give the "
                      "folder of a fit that saved one")
    try:
        finished = runs.is_finished(folder, config)
        epochs, step = disk.read_progress(last)
    except ValueError as err:
        raise Refused(f"{err}; fix: give a run whose checkpoints are intact") from None
    if not finished:
        trainer = config.get("trainer") or {}
        end = (f"{trainer['max_steps']} steps" if (trainer.get("max_steps") or -1) > 0
               else f"{trainer.get('max_epochs')} epochs")
        raise Refused(f"{folder} is unfinished: its last.ckpt holds {epochs} epochs ({step} steps) of {end}; fix: "
                      f"finish it (its fit command again with --ckpt_path {folder}), or leave it out")
    return name, folder, ckpt, config


def load_model(ckpt: Path) -> ImageClassifier:
    """The checkpoint's network in eval mode on the CPU, read weights-only (a file cannot run code)."""
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, a global a weights-only load refuses, ...
        detail = " ".join(str(err).split())[:200]
        raise Refused(f"{ckpt} is not a readable checkpoint ({type(err).__name__}: {detail}); fix: give an intact "
                      ".ckpt file written by this project") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint:
        raise Refused(f"{ckpt} is not a checkpoint of this project (no state_dict and model settings); fix: give a "
                      ".ckpt file written by python -m cutmix_pl fit")
    data = checkpoint.get("datamodule_hyper_parameters")
    data = data if isinstance(data, dict) else {}
    dataset, size = data.get("dataset", "cifar10"), data.get("image_size")
    classes = hparams.get("num_classes", len(cifar.CLASSES))
    if dataset != "cifar10" or classes != len(cifar.CLASSES) or size not in (None, SIDE):
        raise Refused(f"{ckpt} was trained on {dataset} ({classes} classes, {size or SIDE}x{size or SIDE} images), "
                      "but these tests are of the CIFAR-10 test set; fix: give runs trained with data.dataset cifar10")
    net = hparams.get("net")
    class_path = str(net.get("class_path", "")) if isinstance(net, dict) else ""
    if net is not None and not class_path.startswith(TRUSTED_NETS):
        raise Refused(f"{ckpt} holds a network of class {class_path or type(net).__name__!r}, which this command "
                      f"does not import (a class named by a file is code); fix: evaluate networks of "
                      f"{' or '.join(t.rstrip('.') for t in TRUSTED_NETS)} only")
    try:
        model = ImageClassifier(net=net, num_classes=len(cifar.CLASSES), log_images=False)
        model.on_load_checkpoint(checkpoint)  # as Lightning loads one: torch.compile's key names, the network
        model.load_state_dict(checkpoint["state_dict"])
    except (ValueError, TypeError, RuntimeError, ImportError, AttributeError) as err:
        detail = " ".join(str(err).split())[:300]
        raise Refused(f"{ckpt} does not load into its own network ({type(err).__name__}: {detail}); fix: give a "
                      ".ckpt file written by this project") from None
    return model.eval()


def resolve(texts: list[str]) -> list[Run]:
    """Every RUN checked and its network loaded, before anything is evaluated."""
    found: list[Run] = []
    for text in texts:
        name, folder, ckpt, config = find_run(text)
        if any(r.ckpt.resolve() == ckpt.resolve() for r in found):
            raise Refused(f"{ckpt} is given twice; fix: give each run once")
        seed = config.get("seed_everything")
        found.append(Run(name or method_of(config), seed if rules.is_seed(seed) else None, folder, ckpt,
                         load_model(ckpt)))
    return found


# -- evaluation ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict(model: ImageClassifier, batches: Iterable[Tensor]) -> Tensor:
    """Float32 logits of the batches, concatenated, on the CPU."""
    return torch.cat([model(x).float().cpu() for x in batches])


def batches(images: Tensor, batch_size: int, device: torch.device,
            change: Callable[[Tensor], Tensor] = lambda x: x) -> Iterator[Tensor]:
    """uint8 images in batches on ``device``, normalised, then ``change``d."""
    for start in range(0, len(images), batch_size):
        yield change(normalize(images[start:start + batch_size].to(device), cifar.MEAN, cifar.STD))


def mixed_batches(images: Tensor, first: Tensor, second: Tensor, how: str, batch_size: int,
                  device: torch.device) -> Iterator[Tensor]:
    """The pairs (first[k], second[k]) of uint8 images in batches on ``device``, normalised, then mixed."""
    for start in range(0, len(first), batch_size):
        a, b = (normalize(images[idx[start:start + batch_size]].to(device), cifar.MEAN, cifar.STD)
                for idx in (first, second))
        yield mix(a, b, how)


def evaluate(model: ImageClassifier, images: Tensor, labels: Tensor, seed: int, batch_size: int,
             device: torch.device) -> dict[str, dict[Any, float]]:
    """{"centre": {size: acc}, "boundary": {size: acc}, "in_between": {mix: fraction}} for one network."""
    model.to(device)

    def accuracy(change: Callable[[Tensor], Tensor] = lambda x: x) -> float:
        logits = predict(model, batches(images, batch_size, device, change))
        return (logits.argmax(-1) == labels).double().mean().item()

    clean = accuracy()
    out: dict[str, dict[Any, float]] = {}
    for kind in OCCLUSIONS:
        masks = {size: occlusion_mask(kind, size) for size in SIZES}
        out[kind] = {size: accuracy(lambda x, m=m: occlude(x, m)) if m.any() else clean for size, m in masks.items()}
    first, second = pairs(labels, seed)
    out["in_between"] = {}
    for how in MIXES:
        logits = predict(model, mixed_batches(images, first, second, how, batch_size, device))
        out["in_between"][how] = top2_both(logits, labels[first], labels[second]).double().mean().item()
    model.cpu()
    return out


# -- outputs -------------------------------------------------------------------------------------------------
def table_rows(evaluated: list[tuple[Run, dict[str, dict[Any, float]]]], images: int, n_pairs: int
               ) -> dict[str, list[dict[str, Any]]]:
    """The CSVs' rows: {"occlusion_centre": [...], "occlusion_boundary": [...], "in_between": [...]}."""
    tables: dict[str, list[dict[str, Any]]] = {f"occlusion_{k}": [] for k in OCCLUSIONS}
    tables["in_between"] = []
    for run, result in evaluated:
        base = {"method": run.method, "seed": "" if run.seed is None else run.seed, "run": str(run.folder),
                "checkpoint": run.ckpt.name}
        for kind in OCCLUSIONS:
            tables[f"occlusion_{kind}"] += [{**base, "size": s, "acc": round(a, 6), "images": images}
                                            for s, a in result[kind].items()]
        tables["in_between"] += [{**base, "mix": how, "top2_both": round(v, 6), "pairs": n_pairs}
                                 for how, v in result["in_between"].items()]
    return tables


def means(rows: list[dict[str, Any]], key: str, value: str) -> dict[str, tuple[int, dict[Any, float]]]:
    """Per method (in order of first appearance): (its runs, {key: the mean of value over them})."""
    out: dict[str, tuple[int, dict[Any, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        own = [r for r in rows if r["method"] == method]
        keys = list(dict.fromkeys(r[key] for r in own))
        out[method] = (len({(r["run"], r["checkpoint"]) for r in own}),
                       {k: statistics.mean(r[value] for r in own if r[key] == k) for k in keys})
    return out


def csv_bytes(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


PLOTS = {  # table: (key, value, names of the keys or None, title, x axis, y axis)
    "occlusion_centre": ("size", "acc", None, "centre occlusion: the centred s x s square set to 0",
                         "occluded size s (pixels)", "test accuracy (%)"),
    "occlusion_boundary": ("size", "acc", None, "boundary occlusion: all but the centred (32-s) x (32-s) set to 0",
                           "occluded size s (pixels)", "test accuracy (%)"),
    "in_between": ("mix", "top2_both", MIX_NAMES, "in-between-class inputs (two classes, lambda 0.5)",
                   "mixed by", "top-2 predictions = the two classes (%)"),
}


def _lines(table: str, rows: list[dict[str, Any]]) -> tuple[dict[str, tuple[int, dict[Any, float]]], list[Any]]:
    key, value = PLOTS[table][:2]
    lines = means(rows, key, value)
    return lines, list(dict.fromkeys(r[key] for r in rows))


def plot_bytes(table: str, rows: list[dict[str, Any]]) -> bytes | None:
    """The table's PNG, one line per method (the mean over its runs); None without matplotlib."""
    _, _, names, title, xlabel, ylabel = PLOTS[table]
    lines, keys = _lines(table, rows)
    curves = {f"{m} ({n} runs)" if n > 1 else m: [v[k] for k in keys] for m, (n, v) in lines.items()}
    png = io.BytesIO()
    if not events.plot(curves, png, title, x=[names[k] for k in keys] if names else keys, xlabel=xlabel,
                       ylabel=ylabel):
        return None
    return png.getvalue()


def summary(table: str, rows: list[dict[str, Any]]) -> str:
    """The table's means per method as markdown, in %."""
    key, _, names, title = PLOTS[table][:4]
    lines, keys = _lines(table, rows)
    head = [names[k] if names else f"{key} {k}" for k in keys]
    text = [f"{table} ({title}), the mean over each method's runs:", "",
            f"| method | runs | {' | '.join(head)} |", "|" + "---|" * (2 + len(keys))]
    text += [f"| {m} | {n} | " + " | ".join(f"{100 * v[k]:.2f}%" for k in keys) + " |" for m, (n, v) in lines.items()]
    return "\n".join(text) + "\n"


def write(path: Path, data: bytes, what: str) -> None:
    try:
        atomic_write(path, data, what)
    except OSError as err:  # one line: what failed (atomic_write left nothing half-written)
        fail(f"{str(err).split('; fix:')[0]}; fix: free space, or pass another --out")


# -- the command ---------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="robustness.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="[NAME=]RUN", help="run folders or .ckpt files of finished runs")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="the folder holding cifar-10-batches-py/")
    p.add_argument("--out", type=Path, default=Path("robustness"), help="the folder for the CSVs and plots")
    p.add_argument("--device", default="cpu", help="where the networks run: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=1000, help="images per forward pass (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the in-between pairing (default 0)")
    p.add_argument("--images", type=int, default=None, metavar="N",
                   help="the first N test images only, for a quick look (default: all of them)")
    args = p.parse_args(argv)
    if args.images is not None and args.images < 2:
        fail(f"--images {args.images} is out of range: it must be >= 2 (a pair for the in-between test); fix: e.g. "
             "--images 1000, or leave it out for every test image")
    if args.batch_size < 1:
        fail(f"--batch-size {args.batch_size} is out of range: it must be >= 1; fix: e.g. --batch-size 1000")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device {args.device} is not a device; fix: e.g. --device cpu or --device cuda")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} asks for a GPU, and torch sees none here; fix: --device cpu")
    if args.device.type == "cuda" and (args.device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {args.device}: torch sees {torch.cuda.device_count()} GPUs here; fix: e.g. --device cuda")
    if args.out.exists() and not args.out.is_dir():
        fail(f"--out {args.out} is a file, not a folder; fix: pass a folder (it is created if missing)")
    return args


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    args = parse(argv)
    try:
        chosen = resolve(args.runs)
        if cifar.find(args.data_dir) is None:
            raise Refused(f"no CIFAR-10 in {args.data_dir / cifar.FOLDER}; fix: pass --data-dir with the folder that "
                          "holds cifar-10-batches-py/ (python -m cutmix_pl fit downloads it into data/)")
        _, (images, labels) = cifar.load(args.data_dir)
    except (Refused, cifar.DataError) as err:
        fail(str(err))
    if args.images is not None and args.images > len(labels):
        fail(f"--images {args.images} is out of range: {args.data_dir} holds {len(labels)} test images; fix: a value "
             f"in [2, {len(labels)}], or leave it out for all of them")
    images, labels = images[:args.images], labels[:args.images]
    n_pairs = len(pairs(labels, args.seed)[0])
    if n_pairs == 0:
        fail(f"the test set in {args.data_dir} holds one class only: no in-between pairs; fix: pass --data-dir with "
             "CIFAR-10")
    evaluated = []
    for i, run in enumerate(chosen, 1):
        seed = "-" if run.seed is None else run.seed
        print(f"robustness.py: run {i} of {len(chosen)}: {run.method}, seed {seed}, {run.ckpt}: {len(labels)} images, "
              f"{2 * len(SIZES) - 1 + len(MIXES)} passes ...", file=sys.stderr)
        evaluated.append((run, evaluate(run.model, images, labels, args.seed, args.batch_size, args.device)))
        print(f"robustness.py: run {i} of {len(chosen)}: evaluated", file=sys.stderr)
    tables = table_rows(evaluated, len(labels), n_pairs)
    files = {f"{name}.csv": csv_bytes(rows, IN_BETWEEN_COLUMNS if name == "in_between" else OCCLUSION_COLUMNS)
             for name, rows in tables.items()}
    plots = {f"{name}.png": plot_bytes(name, rows) for name, rows in tables.items()}
    files.update({name: png for name, png in plots.items() if png is not None})
    for name, data in files.items():  # every file made before the first is written
        write(args.out / name, data, "the plot" if name.endswith(".png") else "the table")
    for name, rows in tables.items():
        print(summary(name, rows))
    if None in plots.values():
        print("robustness.py: matplotlib is not installed: the CSVs are written, the plots need it "
              "(pip install matplotlib)", file=sys.stderr)
    print(f"robustness.py: wrote {', '.join(files)} in {args.out}")
    return tables


if __name__ == "__main__":
    main()

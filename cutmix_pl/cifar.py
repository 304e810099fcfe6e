"""Reading (and fetching) CIFAR-10 in the python-pickle layout of the official archive.

The pickles are read straight into uint8 tensors: no PIL, no per-image objects. The copy made by
``../shared/data/make_cifar10.py`` has the same layout and is read unchanged.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the CIFAR-10 training images, in [0, 1] units.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class DataError(ValueError):
    """Data missing, unreadable or malformed; the message says what and how to fix it, on one line."""


class Split(NamedTuple):
    images: Tensor  # uint8 [N, 3, 32, 32]
    labels: Tensor  # int64 [N]


def _fix_hint(folder: Path) -> str:
    return (f"pass --data.download true on a machine with internet, or put the python-version batches in "
            f"{folder} (offline: python make_cifar10.py --out {folder.parent}, from the shared data folder)")


def find(root: str | Path) -> Path | None:
    """The ``cifar-10-batches-py`` folder under ``root`` if it is complete, else None."""
    folder = Path(root) / FOLDER
    return folder if all((folder / f).is_file() for f in TRAIN_FILES + TEST_FILES) else None


def download(root: str | Path) -> Path:
    """Fetch and md5-check the official archive into ``root``; raise DataError on one line when that fails."""
    from torchvision.datasets.utils import download_and_extract_archive

    root = Path(root)
    archive, folder = root / "cifar-10-python.tar.gz", root / FOLDER
    made = [p for p in (root, archive, folder) if not p.exists()]  # what a failed attempt must not leave behind
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(URL, str(root), filename=archive.name, md5=ARCHIVE_MD5)
    except Exception as err:  # URLError, socket errors, md5 mismatch, permission: all end the same way
        for p in reversed(made):  # a partial archive or extraction, and the folder if this call created it
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"CIFAR-10 is not in {root / FOLDER} and downloading it failed ({reason}); "
                        f"fix: {_fix_hint(root / FOLDER)}") from None
    folder = find(root)
    if folder is None:
        raise DataError(f"the archive from {URL} did not contain {FOLDER}/ with all batches; fix: {_fix_hint(root / FOLDER)}")
    return folder


def _read_batch(path: Path) -> Split:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data, labels = entry["data"], entry.get("labels", entry.get("fine_labels"))
    except Exception as err:
        raise DataError(f"{path} is truncated or corrupt ({type(err).__name__}: {' '.join(str(err).split())}); "
                        f"fix: delete {path.parent} and fetch or rebuild it ({_fix_hint(path.parent)})") from None
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path} holds data of shape {list(data.shape)} and dtype {data.dtype}; CIFAR-10 batches "
                        f"hold uint8 [N, 3072]; fix: delete {path.parent} and fetch or rebuild it")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES))):
        raise DataError(f"{path} has {labels.size} labels for {data.shape[0]} images, or labels outside "
                        f"[0, {len(CLASSES) - 1}]; fix: delete {path.parent} and fetch or rebuild it")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Split(images, torch.from_numpy(labels))


def load(root: str | Path, download_if_missing: bool = False) -> tuple[Split, Split]:
    """Read (train, test) from ``root/cifar-10-batches-py``, downloading first when allowed."""
    folder = find(root)
    if folder is None:
        if not download_if_missing:
            raise DataError(f"CIFAR-10 is not in {Path(root) / FOLDER}; fix: {_fix_hint(Path(root) / FOLDER)}")
        folder = download(root)
    parts = [[_read_batch(folder / f) for f in files] for files in (TRAIN_FILES, TEST_FILES)]
    train, test = (Split(torch.cat([p.images for p in ps]), torch.cat([p.labels for p in ps])) for ps in parts)
    return train, test


def write_batches(root: str | Path, train: Split, test: Split) -> Path:
    """Write tensors in the official layout (used by tests to make tiny synthetic copies)."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    chunks = [(name, part) for name, part in zip(TRAIN_FILES, _chunks(train, len(TRAIN_FILES)))]
    chunks.append((TEST_FILES[0], test))
    for name, part in chunks:
        entry = {"data": part.images.reshape(len(part.images), -1).numpy(), "labels": part.labels.tolist(),
                 "batch_label": name, "filenames": [f"{i}.png" for i in range(len(part.labels))]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES), "num_cases_per_batch": len(chunks[0][1].labels)}, f)
    return folder


def _chunks(split: Split, k: int) -> list[Split]:
    bounds = np.linspace(0, len(split.labels), k + 1).astype(int)
    return [Split(split.images[a:b], split.labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

"""Reading (and fetching) CIFAR-100 in the python-pickle layout of the official archive (``cifar-100-python/``).

``train`` and ``test`` are pickled dicts with ``data`` (uint8 [N, 3072], R, G, B planes), ``fine_labels`` (100
classes) and ``coarse_labels`` (20 superclasses); ``meta`` holds ``fine_label_names`` and ``coarse_label_names``. They
are read with the same restricted unpickler as CIFAR-10 (``pickles.py``), straight into uint8 tensors.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np

from .dataset import DataError, ImageSet, Split
from . import pickles
from .pickles import CIFARReader, unpickle

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # torchvision's CIFAR100.tgz_md5
FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
Labels = Literal["fine", "coarse"]
NUM_CLASSES = {"fine": 100, "coarse": 20}
# Per-channel statistics of the CIFAR-100 training images, in [0, 1] units (the figures in common use).
MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)


def _fix_hint(folder: Path, downloading: bool = False) -> str:
    fetch = "run again where the internet is reachable" if downloading else \
        "pass --data.download true where the internet is reachable"
    return (f"{fetch}, put the python-version files (train, test, meta) in {folder} (offline: copy them from a "
            f"machine that has them), or pass --data.data_dir with the folder that holds a {FOLDER}/")


def find(root: str | Path) -> Path | None:
    """The ``cifar-100-python`` folder under ``root`` if it holds all three files, else None; DataError when
    ``root`` or that folder is a file."""
    for path in (Path(root), Path(root) / FOLDER):
        if path.exists() and not path.is_dir():
            raise DataError(f"{path} is a file, not a folder; fix: pass --data.data_dir with the folder that holds "
                            f"(or will hold) {FOLDER}/")
    folder = Path(root) / FOLDER
    return folder if all((folder / f).is_file() for f in FILES) else None


def download(root: str | Path, url: str = URL) -> Path:
    """Fetch and md5-check the official archive into ``root`` as torchvision does; DataError on one line when that
    fails, leaving nothing behind. ``url``: another copy of the same archive (the tests serve one locally)."""
    find(root)
    root = Path(root)
    return pickles.download(url, ARCHIVE_MD5, root, FOLDER, "CIFAR-100", "train, test and meta", find,
                            (_fix_hint(root / FOLDER, downloading=True), _fix_hint(root / FOLDER)))


def _read(path: Path) -> dict:
    entry = unpickle(path, "CIFAR-100 file", "CIFAR-100 files",
                     f"fix: delete {path.parent} and fetch it again ({_fix_hint(path.parent)})")
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds a {type(entry).__name__}; CIFAR-100 files are dicts; fix: delete "
                        f"{path.parent} and fetch it again")
    return entry


def class_names(folder: Path, labels: Labels) -> tuple[str, ...]:
    """The fine (100) or coarse (20) class names from ``meta``, in label order."""
    path, key = folder / "meta", f"{labels}_label_names"
    names = _read(path).get(key)
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES[labels] or \
            not all(isinstance(n, str) for n in names):
        raise DataError(f"{path} has no list of {NUM_CLASSES[labels]} names under {key!r}; fix: delete {folder} and "
                        "fetch it again")
    return tuple(names)


def read_split(path: Path, labels: Labels) -> Split:
    """``train`` or ``test`` as uint8 images [N, 3, 32, 32] and the fine or coarse labels as int64."""
    entry, key, k = _read(path), f"{labels}_labels", NUM_CLASSES[labels]
    return pickles.to_split(path, entry.get("data", np.zeros((0, 0))), entry.get(key), key, k, "CIFAR-100 files",
                            f"fix: delete {path.parent} and fetch it again")


def load(root: str | Path, labels: Labels = "fine") -> tuple[Split, Split, tuple[str, ...]]:
    """(train, test, class names) from ``root/cifar-100-python``."""
    folder = find(root)
    if folder is None:
        raise DataError(f"CIFAR-100 is not in {Path(root) / FOLDER}; fix: {_fix_hint(Path(root) / FOLDER)}")
    return read_split(folder / "train", labels), read_split(folder / "test", labels), class_names(folder, labels)


def write_files(root: str | Path, train: tuple, test: tuple, fine_names: list[str], coarse_names: list[str]) -> Path:
    """Write (images, fine labels, coarse labels) in the official layout and key names (tests: tiny synthetic
    copies). The official files are protocol-2 pickles of Python 2 dicts; protocol 2 is written here too."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, (images, fine, coarse) in (("train", train), ("test", test)):
        entry = {"filenames": [f"{i}.png" for i in range(len(fine))], "batch_label": {"train": "training", "test": "testing"}[name] + " batch 1 of 1",
                 "fine_labels": list(fine), "coarse_labels": list(coarse),
                 "data": np.asarray(images, dtype=np.uint8).reshape(len(fine), -1)}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(fine_names), "coarse_label_names": list(coarse_names)}, f, protocol=2)
    return folder


class CIFAR100(CIFARReader):
    name, train_images, total_images = "cifar100", 50_000, 60_000
    mean, std = MEAN, STD

    def __init__(self, data_dir: str | Path, image_size: int | None, labels: Labels = "fine") -> None:
        super().__init__(data_dir, image_size)
        if labels not in NUM_CLASSES:
            raise ValueError(f"data.cifar100_labels={labels!r} is not allowed: choose fine (100 classes) or coarse "
                             "(20 superclasses)")
        self.labels = labels
        # The names come from the files' meta; the count is known before the files exist (the model is built first),
        # so until they are fetched the names are placeholders, replaced by ``read``.
        found = find(self.data_dir)
        self.classes = class_names(found, labels) if found is not None else \
            tuple(f"class_{i}" for i in range(NUM_CLASSES[labels]))

    def prepare(self, may_download: bool) -> None:
        if find(self.data_dir) is None and may_download:
            download(self.data_dir)

    def read(self) -> ImageSet:
        train, test, self.classes = load(self.data_dir, self.labels)
        return ImageSet(train, test, None, self.mean, self.std)

    def describe(self) -> str:
        return f"cifar100 ({self.labels} labels)"

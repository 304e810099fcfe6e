"""Reading (and fetching) CIFAR-10 in the python-pickle layout of the official archive.

The pickles are read straight into uint8 tensors: no PIL, no per-image objects. They are read with a restricted
unpickler that knows only what CIFAR-10 batches contain, so a crafted file cannot run code. Any copy in that layout
(``data_batch_1..5``, ``test_batch``, ``batches.meta``) is read unchanged, whatever its md5 sums.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .dataset import DataError, ImageSet, Split
from . import pickles
from .pickles import CIFARReader, unpickle

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASSES)  # the default of a network built on its own: the default dataset's
# Per-channel statistics of the CIFAR-10 training images, in [0, 1] units.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _fix_hint(folder: Path, downloading: bool = False) -> str:
    fetch = "run again where the internet is reachable" if downloading else \
        "pass --data.download true where the internet is reachable"
    return (f"{fetch}, put the python-version batches (data_batch_1..5, test_batch, batches.meta) in {folder} "
            "(offline: copy them from a machine that has them), or pass --data.data_dir with the folder that holds "
            "a cifar-10-batches-py/")


def check_root(root: str | Path) -> None:
    """``data_dir`` must be a folder (or not exist yet), and so must its ``cifar-10-batches-py``: a file in either
    place gets one line here, not download advice that cannot help."""
    probe = Path(root)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise DataError(f"data.data_dir={str(root)!r}: {probe} is a file, not a folder; fix: pass the folder that "
                        f"holds (or will hold) {FOLDER}/, e.g. --data.data_dir data")
    folder = Path(root) / FOLDER
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; fix: delete it and fetch or rebuild it "
                        f"({_fix_hint(folder)})")


def find(root: str | Path) -> Path | None:
    """The ``cifar-10-batches-py`` folder under ``root`` if it is complete, else None."""
    check_root(root)
    folder = Path(root) / FOLDER
    return folder if all((folder / f).is_file() for f in TRAIN_FILES + TEST_FILES) else None


def download(root: str | Path) -> Path:
    """Fetch and md5-check the official archive into ``root``; raise DataError on one line when that fails."""
    check_root(root)
    root = Path(root)
    return pickles.download(URL, ARCHIVE_MD5, root, FOLDER, "CIFAR-10", "all batches", find,
                            (_fix_hint(root / FOLDER, downloading=True), _fix_hint(root / FOLDER)))


# Everything a CIFAR-10 batch pickle refers to is allowed by pickles.SAFE_GLOBALS; plain pickle.load would import and
# call anything a file names.
def _unpickle(path: Path) -> object:
    """What ``path`` holds, read with the safe unpickler (``pickles.py``); DataError (one line) otherwise."""
    return unpickle(path, "CIFAR-10 batch", "CIFAR-10 batches",
                    f"fix: delete {path.parent} and fetch or rebuild it ({_fix_hint(path.parent)})")


def _read_batch(path: Path) -> Split:
    """One batch file as uint8 images [N, 3, 32, 32] and int64 labels; DataError naming the file otherwise."""
    entry = _unpickle(path)
    if not isinstance(entry, dict) or "data" not in entry:
        raise DataError(f"{path} holds a {type(entry).__name__} without 'data'; CIFAR-10 batches are dicts with "
                        f"'data' and 'labels'; fix: delete {path.parent} and fetch or rebuild it")
    return pickles.to_split(path, entry["data"], entry.get("labels"), "labels", len(CLASSES), "CIFAR-10 batches",
                            f"fix: delete {path.parent} and fetch or rebuild it")


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


class CIFAR10(CIFARReader):
    name, classes, train_images, total_images = "cifar10", CLASSES, 50_000, 60_000
    mean, std = MEAN, STD

    def prepare(self, may_download: bool) -> None:
        if find(self.data_dir) is None and may_download:
            download(self.data_dir)

    def read(self) -> ImageSet:
        train, test = load(self.data_dir, download_if_missing=False)
        return ImageSet(train, test, None, self.mean, self.std)

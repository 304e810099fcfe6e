"""The datasets ``data.dataset`` chooses among, each a small :class:`~cutmix_pl.dataset.Reader`.

``cifar10`` (``cifar.py``, unchanged), ``cifar100`` (``cifar100.py``, fine or coarse labels) and ``folder``
(``folder.py``: a folder of one's own images, decoded once into a cache, ``image_cache.py``). A new dataset is a new
Reader subclass and one entry in :data:`READERS`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from . import cifar, cifar100, folder, image_cache
from .dataset import DataError, ImageSet, Reader, Split

__all__ = ["CIFAR10", "CIFAR100", "DatasetName", "Folder", "READERS", "make_reader"]

DatasetName = Literal["cifar10", "cifar100", "folder"]


class _CIFAR(Reader):
    """What the CIFAR readers share: 32x32 images, published statistics, sizes known before reading."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, data_dir: str | Path, image_size: int | None) -> None:
        if image_size not in (None, 32):
            raise ValueError(f"data.image_size={image_size!r} does not apply to {self.name}, whose images are 32x32; "
                             "fix: leave data.image_size null (it resizes a folder dataset)")
        self.data_dir = Path(data_dir)

    @property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std

    @property
    def image_size(self) -> tuple[int, int]:
        return 32, 32

    def nbytes(self) -> int:
        return self.total_images * 3 * 32 * 32


class CIFAR10(_CIFAR):
    name, classes, train_images, total_images = "cifar10", cifar.CLASSES, 50_000, 60_000
    mean, std = cifar.MEAN, cifar.STD

    def prepare(self, download: bool) -> None:
        if cifar.find(self.data_dir) is None and download:
            cifar.download(self.data_dir)

    def read(self) -> ImageSet:
        train, test = cifar.load(self.data_dir, download_if_missing=False)
        return ImageSet(train, test, None, self.mean, self.std)


class CIFAR100(_CIFAR):
    name, train_images, total_images = "cifar100", 50_000, 60_000
    mean, std = cifar100.MEAN, cifar100.STD

    def __init__(self, data_dir: str | Path, image_size: int | None, labels: cifar100.Labels = "fine") -> None:
        super().__init__(data_dir, image_size)
        if labels not in cifar100.NUM_CLASSES:
            raise ValueError(f"data.cifar100_labels={labels!r} is not allowed: choose fine (100 classes) or coarse "
                             "(20 superclasses)")
        self.labels = labels
        # The names come from the files' meta; the count is known before the files exist (the model is built first),
        # so until they are fetched the names are placeholders, replaced by ``read``.
        found = cifar100.find(self.data_dir)
        self.classes = cifar100.class_names(found, labels) if found is not None else \
            tuple(f"class_{i}" for i in range(cifar100.NUM_CLASSES[labels]))

    def prepare(self, download: bool) -> None:
        if cifar100.find(self.data_dir) is None and download:
            cifar100.download(self.data_dir)

    def read(self) -> ImageSet:
        train, test, self.classes = cifar100.load(self.data_dir, self.labels)
        return ImageSet(train, test, None, self.mean, self.std)

    def describe(self) -> str:
        return f"cifar100 ({self.labels} labels)"


class Folder(Reader):
    """``data_dir`` holds ``train/<class>/*`` and ``test/<class>/*`` (and optionally ``val/<class>/*``)."""

    name = "folder"

    def __init__(self, data_dir: str | Path, image_size: int | None, cache_dir: str | Path | None = None,
                 progress: bool = True) -> None:
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or not 8 <= image_size <= 4096):
            raise ValueError(f"data.image_size={image_size!r} is out of range: it must be an integer in [8, 4096] "
                             "or null (the images' common size); fix: e.g. 32 or 64")
        self.listing = folder.scan(data_dir)  # the layout is checked at construction, before anything is decoded
        self.classes, self.size = self.listing.classes, image_size
        self.cache = image_cache.cache_path(Path(cache_dir) if cache_dir is not None else Path(data_dir), image_size)
        self.progress = progress
        self._shape: tuple[int, int] | None = (image_size, image_size) if image_size is not None else None

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self._shape

    def _common_shape(self) -> tuple[int, int]:
        if self._shape is None:  # the first training image's, read from its header; every other must match
            self._shape = tuple(folder.header_size(self.listing.files["train"][0][0]))
        return self._shape

    def nbytes(self) -> int:
        if self.cache.is_file():
            meta = image_cache.read_meta(self.cache)
            return int(meta["count"]) * 3 * int(meta["height"]) * int(meta["width"])
        h, w = self._common_shape()
        return self.listing.count() * 3 * h * w

    def prepare(self, download: bool) -> None:
        """Decode into the cache when it is missing; a cache of other files is refused (``_check``)."""
        if self.cache.is_file():
            self._check(image_cache.read_meta(self.cache))
        else:
            self._build()

    def _check(self, meta: dict) -> None:
        if meta.get("fingerprint") != self.listing.fingerprint(self.size):
            now = self.listing.count()
            change = f"{meta.get('count')} files then, {now} now" if meta.get("count") != now else \
                "as many files, but names, sizes or modification times differ"
            raise DataError(f"the image cache {self.cache} was made from other files than {self.listing.root} holds "
                            f"now ({change}); fix: delete it to decode the images again")

    def _build(self) -> None:
        shape = self._common_shape()
        arrays = {}
        for split, files in self.listing.files.items():
            images, labels = folder.decode(files, self.size, shape, f"{self.listing.root / split}", self.progress)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        mean, std = folder.channel_stats(arrays["train_images"])
        image_cache.write(self.cache, arrays, {
            "fingerprint": self.listing.fingerprint(self.size), "count": self.listing.count(), "classes":
            list(self.classes), "mean": mean, "std": std, "height": shape[0], "width": shape[1]})
        if self.progress:
            print(f"cutmix-pl: decoded {self.listing.count()} images of {self.listing.root} once into {self.cache}",
                  file=sys.stderr)

    def read(self) -> ImageSet:
        if not self.cache.is_file():  # prepare_data did not run (a script, a test): decode here
            self._build()
        meta = image_cache.read_meta(self.cache)
        self._check(meta)
        arrays = image_cache.read_arrays(self.cache)
        self._shape = (int(meta["height"]), int(meta["width"]))

        def split(name: str) -> Split | None:
            if f"{name}_images" not in arrays:
                return None
            return Split(torch.from_numpy(np.ascontiguousarray(arrays[f"{name}_images"])),
                         torch.from_numpy(arrays[f"{name}_labels"].astype(np.int64)))

        return ImageSet(split("train"), split("test"), split("val"), tuple(meta["mean"]), tuple(meta["std"]))

    def describe(self) -> str:
        return f"folder ({len(self.classes)} classes: {', '.join(self.classes)})"


READERS: dict[str, type[Reader]] = {"cifar10": CIFAR10, "cifar100": CIFAR100, "folder": Folder}


def make_reader(dataset: str, data_dir: str | Path, image_size: int | None, cifar100_labels: str,
                cache_dir: str | Path | None) -> Reader:
    """The reader ``data.dataset`` names, with the settings that apply to it."""
    if dataset == "cifar10":
        return CIFAR10(data_dir, image_size)
    if dataset == "cifar100":
        return CIFAR100(data_dir, image_size, cifar100_labels)  # type: ignore[arg-type]
    if dataset == "folder":
        return Folder(data_dir, image_size, cache_dir)
    raise ValueError(f"data.dataset={dataset!r} is not allowed: choose one of {', '.join(READERS)}")

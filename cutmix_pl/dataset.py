"""What every dataset reader gives the DataModule, and the interface a reader implements.

A reader knows one dataset: where its files live under ``data.data_dir``, how to fetch or pre-decode them
(``prepare``, once per node), how many bytes its images take as uint8 (``nbytes``, asked before anything is read, so
that a dataset that cannot be held on the device is refused first), and how to read them into uint8 tensors
(``read``). The DataModule does everything else (splits, loaders, the transform, checkpointed state) the same way for
every reader. There is no Lightning import here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

from torch import Tensor

__all__ = ["DataError", "ImageSet", "Reader", "Split"]


class DataError(ValueError):
    """Data missing, unreadable or malformed; the message says what and how to fix it, on one line."""


class Split(NamedTuple):
    images: Tensor  # uint8 [N, 3, H, W]
    labels: Tensor  # int64 [N]


class ImageSet(NamedTuple):
    """A dataset as read: its splits, and the per-channel statistics of its training images in [0, 1] units."""

    train: Split
    test: Split
    val: Split | None  # a validation split of its own (a folder's val/); None: held out of train by val_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Reader(ABC):
    """One dataset behind the DataModule (``data.dataset``); see docs/design.md, "Datasets".

    Subclasses set ``name`` (the value of ``data.dataset``; setting it registers the reader) and take
    ``(data_dir, image_size)`` plus, by keyword, any of the DataModule's reader settings they use (``labels``: its
    ``cifar100_labels``; ``cache_dir``). They set, at construction and without reading any image,
    ``classes`` (the class names, index order); ``train_images`` when the size of the training set is known without
    reading it (so that ``data.val_size`` is checked at construction), else None.
    """

    name: str
    classes: tuple[str, ...]
    train_images: int | None = None
    registry: dict[str, type[Reader]] = {}  # name -> class, filled as each reader's module is imported

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete reader (a shared base such as the CIFAR one names none)
            Reader.registry[cls.name] = cls

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Mean and std known without reading (published figures), else None (computed by ``read``)."""
        return None

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) of every image, when known without reading; else None until ``read``."""
        return None

    def prepare(self, may_download: bool) -> None:
        """Fetch what is missing (when ``may_download``) or pre-decode, once per node; nothing by default."""

    @abstractmethod
    def nbytes(self) -> int:
        """The uint8 bytes of every image of every split (labels aside), without decoding any image."""

    @abstractmethod
    def read(self) -> ImageSet:
        """All splits as uint8 tensors; DataError (one line) when the files are missing or damaged."""

    def files(self, split: str) -> list[str] | None:
        """The image file of each image of ``split`` (``train``, ``val``, ``test``), in the split's order, for a
        dataset read from files (a folder); None for one without file names (CIFAR's pickles)."""
        return None

    def describe(self) -> str:
        """What a checkpoint records about the data, to refuse resuming or evaluating a run on another dataset."""
        return self.name

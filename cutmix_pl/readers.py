"""Which :class:`~cutmix_pl.dataset.Reader` ``data.dataset`` names.

Each dataset is one file holding its reader: ``cifar10`` (``cifar.py``), ``cifar100`` (``cifar100.py``, fine or
coarse labels) and ``folder`` (``folder.py``: a folder of one's own images, decoded once into a cache,
``image_cache.py``). A reader registers itself by its ``name``; a new dataset is one new file with a Reader
subclass, named on the command line by its dotted path (``--data.dataset mypackage.myreader.MyReader``): no other
change (docs/design.md, "Datasets").
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from . import cifar, cifar100, folder  # noqa: F401 (imported to register the built-in readers)
from .dataset import Reader

__all__ = ["find_reader", "make_reader"]


def find_reader(dataset: str) -> type[Reader]:
    """The Reader class ``data.dataset`` names: a registered name, or the dotted path of a Reader subclass."""
    if dataset in Reader.registry:
        return Reader.registry[dataset]
    module, _, attr = str(dataset).rpartition(".")
    found = None
    if module:
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            found = None
    if not (inspect.isclass(found) and issubclass(found, Reader)):
        raise ValueError(f"data.dataset={dataset!r} is not allowed: choose one of {', '.join(sorted(Reader.registry))}, "
                         "or the dotted path of a cutmix_pl.dataset.Reader subclass (e.g. mypackage.myreader.MyReader)")
    return found


def make_reader(dataset: str, data_dir: str | Path, image_size: int | None, **settings: object) -> Reader:
    """The reader ``data.dataset`` names, given those of the DataModule's reader ``settings`` its class takes."""
    cls = find_reader(dataset)
    takes = inspect.signature(cls.__init__).parameters
    return cls(data_dir, image_size, **{k: v for k, v in settings.items() if k in takes})

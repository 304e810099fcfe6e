"""The decoded images of a folder dataset, kept in one ``.npz`` file beside the data, so later starts skip decoding.

The file holds plain arrays only (uint8 images, int64 labels, and a JSON string of metadata: the class names, mean,
std and the fingerprint of the files it was made from) and is loaded with ``allow_pickle=False``: it cannot run code.
It is written atomically, so a crash leaves no half-written cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import DataError
from .files import WriteError, atomic_write

__all__ = ["VERSION", "cache_path", "read_meta", "read_arrays", "write"]

VERSION = 1  # of the file's layout: a cache of another version is refused (delete it to decode again)


def cache_path(folder: Path, image_size: int | None) -> Path:
    """One file per decode setting, so a run at another ``image_size`` does not overwrite this one."""
    return folder / f"cutmix_pl-cache-{image_size if image_size is not None else 'native'}.npz"


def _damaged(path: Path, err: Exception) -> DataError:
    return DataError(f"the image cache {path} is damaged ({type(err).__name__}: {' '.join(str(err).split())}); fix: "
                     "delete it, and the next start decodes the images again")


def read_meta(path: Path) -> dict[str, Any]:
    """The cache's metadata, without reading its images."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
    except Exception as err:  # not a zip, no meta, bad JSON, a pickled array (refused by allow_pickle=False)
        raise _damaged(path, err) from None
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        raise DataError(f"the image cache {path} has layout version {meta.get('version') if isinstance(meta, dict) else None}, "
                        f"this cutmix_pl reads version {VERSION}; fix: delete it to decode the images again")
    return meta


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the cache but its metadata."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != "meta"}
    except Exception as err:
        raise _damaged(path, err) from None


def write(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write atomically (``files.atomic_write``): a kill leaves the old cache or none, never part of one."""
    try:
        atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps({**meta, "version": VERSION})), **arrays),
                     what="the image cache", fix="pass --data.cache_dir with a writable folder that has room")
    except WriteError as err:
        raise DataError(str(err)) from None

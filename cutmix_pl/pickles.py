"""What the CIFAR-10 and CIFAR-100 readers share: a pickle reader that cannot run code, the checks that turn a
pickle's arrays into a split, and the fetch of an official archive that leaves nothing behind when it fails.

Both datasets ship as pickles of numpy arrays (python-version archives). Plain ``pickle.load`` imports and calls
whatever a file names, so a crafted file would run code: :func:`unpickle` allows only what these files contain.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .dataset import DataError, Reader, Split

__all__ = ["CIFARReader", "ForbiddenGlobal", "SafeUnpickler", "download", "fetch_archive", "to_split", "unpickle"]

# Everything a CIFAR batch pickle refers to by name: numpy's array reconstruction (old and new module paths) and the
# codec that protocol-2 pickles use for bytes.
SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """A file names a global outside ``SAFE_GLOBALS``; the message is its ``module.name``."""


class SafeUnpickler(pickle.Unpickler):
    """Reads CIFAR pickles and nothing else: any other global is refused before it is imported."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in SAFE_GLOBALS:
            raise ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def unpickle(path: Path, what: str, plural: str, refetch: str) -> object:
    """What ``path`` holds, read with :class:`SafeUnpickler`; DataError (one line) if it names a forbidden global or
    is damaged. ``what`` and ``plural`` name the kind of file ("CIFAR-10 batch", "CIFAR-10 batches"), ``refetch`` is
    the fix. latin1 because the official
    files were pickled by Python 2 (its byte strings become str)."""
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, encoding="latin1").load()
    except ForbiddenGlobal as err:
        raise DataError(f"{path} is not a {what} and was not loaded: it refers to {err}, which {plural} never do "
                        f"(a pickle can run code); {refetch}") from None
    except Exception as err:  # truncated, garbage, unreadable: all end the same way
        raise DataError(f"{path} is truncated or corrupt ({type(err).__name__}: {' '.join(str(err).split())}); "
                        f"{refetch}") from None


def to_split(path: Path, data: object, labels: object, key: str, num_classes: int, layout: str, fix: str) -> Split:
    """A pickle's ``data`` and its labels (found under ``key``) as uint8 images [N, 3, 32, 32] and int64 labels;
    DataError naming ``path`` when they are not ``layout``'s uint8 [N, 3072] or not integer class indices in
    [0, num_classes) (3.7, 3.0, "3" and True are refused). Every message ends with ``fix``."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path} holds data of shape {list(data.shape)} and dtype {data.dtype}; {layout} hold uint8 "
                        f"[N, 3072] under 'data'; {fix}")
    if data.shape[0] == 0:  # caught here, not as a division by zero or an empty loader deep inside training
        raise DataError(f"{path} holds no images; {fix}")
    values = labels.tolist() if isinstance(labels, np.ndarray) else labels
    if not isinstance(values, (list, tuple)) or len(values) != data.shape[0]:
        n = len(values) if isinstance(values, (list, tuple)) else "no"
        raise DataError(f"{path} has {n} labels under {key!r}, not one for each of its {data.shape[0]} images; {fix}")
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))), None)
    if bad is not None:
        raise DataError(f"{path} has a label {bad!r} of type {type(bad).__name__}: labels are integer class indices "
                        f"(under {key!r}); {fix}")
    out = torch.tensor(values, dtype=torch.int64)
    if out.min() < 0 or out.max() >= num_classes:
        raise DataError(f"{path} has {key} outside [0, {num_classes - 1}]; {fix}")
    return Split(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), out)


def fetch_archive(url: str, md5: str, root: Path, folder: Path) -> None:
    """Download ``url`` into ``root``, check its md5 and extract it (torchvision's own routine); on any failure remove
    what this call created (a partial archive or extraction, and ``root`` if it made it) and re-raise."""
    from torchvision.datasets.utils import download_and_extract_archive

    archive = root / url.rsplit("/", 1)[-1]
    made = [p for p in (root, archive, folder) if not p.exists()]  # what a failed attempt must not leave behind
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(url, str(root), filename=archive.name, md5=md5)
    except BaseException:
        for p in reversed(made):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        raise


def download(url: str, md5: str, root: Path, folder: str, dataset: str, holds: str,
             find: Callable[[Path], Path | None], fixes: tuple[str, str]) -> Path:
    """:func:`fetch_archive` with a CIFAR reader's one-line errors: the download failed (``fixes[0]``), or the
    archive did not hold ``folder``/ with ``holds`` (``fixes[1]``). Returns the folder ``find`` finds."""
    try:
        fetch_archive(url, md5, root, root / folder)
    except Exception as err:  # URLError, socket errors, md5 mismatch, permission: all end the same way
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{dataset} is not in {root / folder} and downloading it failed ({reason}); "
                        f"fix: {fixes[0]}") from None
    found = find(root)
    if found is None:
        raise DataError(f"the archive from {url} did not contain {folder}/ with {holds}; fix: {fixes[1]}")
    return found


class CIFARReader(Reader):
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

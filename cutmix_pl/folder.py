"""A folder of one's own images: ``ROOT/train/<class>/*``, ``ROOT/test/<class>/*`` and optionally ``ROOT/val/<class>/*``.

:func:`scan` lists the files and checks the layout without opening any image (one line per problem: a missing split,
an empty class folder, a file that is not an image by its name, train and test with different classes);
:func:`decode` turns the files into uint8 tensors, each image once, with a progress bar, resized to ``image_size``
when given. Classes are the class folders of ``train/``, sorted by name; images within a class, sorted by name.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError, features

from . import image_cache
from .dataset import DataError, ImageSet, Reader, Split

__all__ = ["Folder", "EXTENSIONS", "Listing", "channel_stats", "decode", "header_size", "scan"]

# WebP only where this Pillow was built with it: a .webp file is otherwise "not an image" here, with that reason.
EXTENSIONS = (".jpg", ".jpeg", ".png") + ((".webp",) if features.check("webp") else ())
SPLITS = ("train", "val", "test")
LAYOUT = "ROOT/train/<class>/*.jpg|png and ROOT/test/<class>/*"


class Listing(NamedTuple):
    """What :func:`scan` found: the class names and, per split present, its files and their labels."""

    root: Path
    classes: tuple[str, ...]
    files: dict[str, list[tuple[Path, int]]]  # split -> [(file, label)], in class then name order

    def count(self) -> int:
        return sum(len(f) for f in self.files.values())

    def fingerprint(self, image_size: int | None) -> tuple[str, dict[str, str]]:
        """A digest of every file's path, size and modification time and the decode setting (what the cache was
        made from), and one per class folder (``train/cat``: where a change lies). Stat only: a start stays fast."""
        whole, folders = hashlib.sha256(f"image_size={image_size}\n".encode()), {}
        for split, files in self.files.items():
            for path, label in files:
                st = path.stat()
                line = f"{path.relative_to(self.root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
                whole.update(line)
                folders.setdefault(f"{split}/{self.classes[label]}", hashlib.sha256()).update(line)
        return whole.hexdigest(), {name: h.hexdigest() for name, h in folders.items()}


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))  # .DS_Store and the like


def scan(root: str | Path) -> Listing:
    """The layout under ``root``, checked; DataError (one line) on the first problem."""
    root = Path(root)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"data.data_dir={str(root)!r} has no {split}/ folder; a folder dataset is laid out as "
                            f"{LAYOUT} (val/ optional); fix: make that layout or pass --data.data_dir with its ROOT")
    classes = tuple(p.name for p in _entries(root / "train") if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{root / 'train'} has {len(classes)} class folder(s); classification needs at least 2; "
                        f"fix: one folder per class, {LAYOUT}")
    files = {split: _split_files(root / split, classes) for split in SPLITS if (root / split).is_dir()}
    return Listing(root, classes, files)


def _split_files(folder: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    entries = _entries(folder)
    stray = next((p for p in entries if not p.is_dir()), None)
    if stray is not None:
        raise DataError(f"{stray} is not in a class folder: {folder} holds only one folder per class; fix: move it "
                        "into its class folder or out of the dataset")
    found = tuple(p.name for p in entries)
    if found != classes:
        only_here, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise DataError(f"{folder} has other classes than train/: only here {only_here}, missing here {missing}; "
                        "every split needs the same class folders; fix: add or remove class folders so they agree")
    out: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        images = _entries(folder / name)
        if not images:
            raise DataError(f"the class folder {folder / name} is empty; fix: put its images in, or remove the class "
                            "from every split")
        for path in images:
            if path.is_dir() or path.suffix.lower() not in EXTENSIONS:
                kind = "a folder" if path.is_dir() else "not an image by its name"
                raise DataError(f"{path} is {kind}: class folders hold image files ({', '.join(EXTENSIONS)}); fix: "
                                "remove it or move it out of the dataset")
            out.append((path, label))
    return out


def _as_rgb(im: Image.Image) -> Image.Image:
    """The image as 8-bit RGB. A 16-bit greyscale PNG (Pillow's mode I;16, or I) is scaled to 8 bits, as
    round(v * 255 / 65535): ``convert("RGB")`` would clip every value above 255 to white."""
    if not im.mode.startswith("I"):
        return im.convert("RGB")
    grey = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
    return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")


def _open(path: Path, image_size: int | None) -> np.ndarray:
    """One file as uint8 [3, H, W]: RGB, and resized (shorter side, then a centre crop) when ``image_size`` is set
    and the image has another size."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path} cannot be read ({type(err).__name__}: {err.strerror or err}); fix: check its "
                        "permissions or remove it") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = _as_rgb(im)  # decodes the whole file: a truncated one fails here
    except UnidentifiedImageError:
        raise DataError(f"{path} is not an image Pillow can read, whatever its name says; fix: remove it or "
                        "replace it with the image") from None
    except Exception as err:  # truncated or corrupt data
        raise DataError(f"{path} is a damaged image ({type(err).__name__}: {' '.join(str(err).split())}); fix: "
                        "replace or remove it") from None
    if image_size is not None and rgb.size != (image_size, image_size):
        rgb = ImageOps.fit(rgb, (image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def header_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding it."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:
        return _open(path, None).shape[1:]  # the one-line reason why the file cannot be opened


def decode(files: list[tuple[Path, int]], image_size: int | None, shape: tuple[int, int], what: str,
           progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Every file as uint8 [N, 3, H, W] and int64 labels [N], ``shape`` = (H, W) the size all must have (the common
    size, or ``image_size`` squared); DataError naming the first file of another size when ``image_size`` is None."""
    images = np.empty((len(files), 3, *shape), dtype=np.uint8)
    labels = np.fromiter((label for _, label in files), dtype=np.int64, count=len(files))
    bar = _bar(len(files), what, progress)

    def one(i: int) -> None:
        img = _open(files[i][0], image_size)
        if img.shape[1:] != shape:
            raise DataError(f"{files[i][0]} is {img.shape[2]}x{img.shape[1]}, {files[0][0]} is {shape[1]}x{shape[0]}: "
                            "images of different sizes need a common one; fix: pass --data.image_size N (each image "
                            "is resized once, shorter side to N, centre-cropped to NxN)")
        images[i] = img

    # Pillow decodes without holding the GIL, so threads decode in parallel; the order of the files is kept.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), 1024):
            list(pool.map(one, range(start, min(start + 1024, len(files)))))
            bar.update(min(1024, len(files) - start))
    bar.close()
    return images, labels


def _bar(total: int, what: str, on: bool):  # noqa: ANN202 (tqdm's type)
    from tqdm import tqdm

    return tqdm(total=total, desc=f"decoding {what}", unit="img", disable=not on, file=sys.stderr, leave=False)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 [N, 3, H, W] images in [0, 1] units, in chunks of float64."""
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for start in range(0, len(images), 4096):
        chunk = images[start:start + 4096].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk ** 2).sum(axis=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


class Folder(Reader):
    """``data_dir`` holds ``train/<class>/*`` and ``test/<class>/*`` (and optionally ``val/<class>/*``)."""

    name = "folder"

    def __init__(self, data_dir: str | Path, image_size: int | None, cache_dir: str | Path | None = None,
                 progress: bool = True) -> None:
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or not 8 <= image_size <= 4096):
            raise ValueError(f"data.image_size={image_size!r} is out of range: it must be an integer in [8, 4096] "
                             "or null (the images' common size); fix: e.g. 32 or 64")
        self.listing = scan(data_dir)  # the layout is checked at construction, before anything is decoded
        self.classes, self.size = self.listing.classes, image_size
        # data.val_size is checked at construction, before any decoding, unless a val/ folder makes it unused
        self.train_images = None if "val" in self.listing.files else len(self.listing.files["train"])
        self.cache = image_cache.cache_path(Path(cache_dir) if cache_dir is not None else Path(data_dir), image_size)
        self.progress = progress
        self._shape: tuple[int, int] | None = (image_size, image_size) if image_size is not None else None
        self._digests: tuple[str, dict[str, str]] | None = None

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self._shape

    def _common_shape(self) -> tuple[int, int]:
        if self._shape is None:  # the first training image's, read from its header; every other must match
            self._shape = tuple(header_size(self.listing.files["train"][0][0]))
        return self._shape

    def nbytes(self) -> int:
        if self.cache.is_file():
            meta = image_cache.read_meta(self.cache)
            return int(meta["count"]) * 3 * int(meta["height"]) * int(meta["width"])
        h, w = self._common_shape()
        return self.listing.count() * 3 * h * w

    def prepare(self, may_download: bool) -> None:
        """Decode into the cache when it is missing; a cache of other files is refused (``_check``)."""
        if self.cache.is_file():
            self._check(image_cache.read_meta(self.cache))
        else:
            self._build()

    def _fingerprint(self) -> tuple[str, dict[str, str]]:
        # once per start: prepare() and read() (or _build() and read()) check the same listing, one stat pass
        if self._digests is None:
            self._digests = self.listing.fingerprint(self.size)
        return self._digests

    def _check(self, meta: dict) -> None:
        whole, folders = self._fingerprint()
        if meta.get("fingerprint") != whole:
            now, then = self.listing.count(), meta.get("folders") or {}  # caches of earlier versions lack folders
            change = f"{meta.get('count')} files then, {now} now" if meta.get("count") != now else \
                "as many files, but names, sizes or modification times differ"
            changed = [name for name in sorted({*then, *folders}) if then.get(name) != folders.get(name)]
            if then and changed:
                more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
                change += f"; changed: {', '.join(changed[:4])}{more}"
            raise DataError(f"the image cache {self.cache} was made from other files than {self.listing.root} holds "
                            f"now ({change}); fix: delete it to decode the images again")

    def _build(self) -> None:
        shape = self._common_shape()
        arrays = {}
        for split, files in self.listing.files.items():
            images, labels = decode(files, self.size, shape, f"{self.listing.root / split}", self.progress)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        mean, std = channel_stats(arrays["train_images"])
        whole, folders = self._fingerprint()  # after decoding, which names a file it cannot read in one line
        image_cache.write(self.cache, arrays, {
            "fingerprint": whole, "folders": folders, "count": self.listing.count(), "classes": list(self.classes),
            "mean": mean, "std": std, "height": shape[0], "width": shape[1]})
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

    def files(self, split: str) -> list[str] | None:
        # the cache holds the images in the listing's order (_build decodes listing.files as they are)
        found = self.listing.files.get(split)
        return None if found is None else [p.relative_to(self.listing.root).as_posix() for p, _ in found]

    def describe(self) -> str:
        return f"folder ({len(self.classes)} classes: {', '.join(self.classes)})"

"""Start-up time of a folder dataset: the first start (decode every image, write the cache) and the second (read the
cache), each from a new DataModule to the end of ``setup("fit")``. Python and torch imports are not included.

    python scripts/bench_data.py                       # unpacks ../shared/data/cifar10-jpeg.tar.gz (60,000 JPEGs)
    python scripts/bench_data.py --root my_images --image-size 64

With ``--root`` the folder's cache (``cutmix_pl-cache-*.npz``) is moved aside first, so the first start decodes, and
put back afterwards; the unpacked archive is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from cutmix_pl import image_cache
from cutmix_pl.data import CIFAR10DataModule

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def start(root: Path, image_size: int | None) -> tuple[float, int]:
    """Seconds from a new DataModule to the end of setup("fit"), and the number of images it holds."""
    t0 = time.perf_counter()
    dm = CIFAR10DataModule(str(root), dataset="folder", image_size=image_size, mixer=None, val_size=0, batch_size=2,
                           download=False)
    dm.prepare_data()
    dm.setup("fit")
    seconds = time.perf_counter() - t0
    return seconds, sum(len(dm.split(s).labels) for s in ("train", "test"))


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="a folder dataset (ROOT/train/<class>/*, ROOT/test/<class>/*); "
                                              "default: the shared archive, unpacked into a temporary folder")
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    ap.add_argument("--image-size", type=int, default=None)
    args = ap.parse_args(argv)
    tmp = None
    if args.root is None:
        if not args.archive.is_file():
            sys.exit(f"bench_data: no archive {args.archive}; fix: pass --root with a folder dataset or --archive")
        tmp = Path(tempfile.mkdtemp(prefix="bench_data-"))
        t0 = time.perf_counter()
        with tarfile.open(args.archive) as tar:
            tar.extractall(tmp, filter="data")
        print(f"unpacked {args.archive.name} in {time.perf_counter() - t0:.1f} s")
        args.root = tmp
    cache = image_cache.cache_path(args.root, args.image_size)
    aside = cache.with_name(cache.name + ".aside")
    if cache.exists():
        cache.rename(aside)
    try:
        first, n = start(args.root, args.image_size)
        second, _ = start(args.root, args.image_size)
    finally:
        if aside.exists():
            aside.replace(cache)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{n} images: first start (decode, cache write) {first:.1f} s ({n / first:.0f} img/s); "
          f"second start (cache) {second:.2f} s")
    return {"images": n, "first_s": first, "second_s": second}


if __name__ == "__main__":
    main()

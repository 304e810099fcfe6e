"""The shared cifar10-jpeg.tar.gz is itself a folder dataset: the folder reader must yield exactly the images and
labels of the pickles that make_cifar10.py builds from it (same tensors up to order)."""

from __future__ import annotations

import tarfile
import time

import numpy as np
import pytest
import torch

from cutmix_pl import cifar
from cutmix_pl.folder import Folder

from conftest import SHARED

ARCHIVE = SHARED / "cifar10-jpeg.tar.gz"


def rows(images, labels) -> np.ndarray:
    """Each image's bytes followed by its label, as one sortable row (numpy compares void rows as bytes)."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1).numpy())
    both = np.concatenate([flat, labels.numpy().astype(np.uint8)[:, None]], axis=1)
    return np.sort(both.view(np.dtype((np.void, both.shape[1]))).ravel())


@pytest.mark.slow(seconds=60)
def test_the_folder_reader_reads_the_shared_copy_as_make_cifar10_does(real_cifar, tmp_path):
    if not ARCHIVE.is_file():
        pytest.skip(f"no {ARCHIVE}")
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    reader = Folder(tmp_path, None, progress=False)
    assert reader.classes == tuple(sorted(cifar.CLASSES))  # sorted by name, as make_cifar10 lists them in its order
    assert reader.nbytes() == 60_000 * 3 * 32 * 32
    start = time.perf_counter()
    data = reader.read()
    first = time.perf_counter() - start
    train, test = cifar.load(real_cifar)
    # make_cifar10 numbers the classes in CIFAR-10's order; the folder reader by name: map one onto the other
    to_folder = np.array([reader.classes.index(c) for c in cifar.CLASSES])
    for ours, theirs in ((data.train, train), (data.test, test)):
        assert ours.images.shape == theirs.images.shape and ours.images.dtype == theirs.images.dtype
        relabelled = torch.from_numpy(to_folder[theirs.labels.numpy()])
        assert np.array_equal(rows(ours.images, ours.labels), rows(theirs.images, relabelled))
    start = time.perf_counter()
    again = Folder(tmp_path, None, progress=False).read()
    second = time.perf_counter() - start
    assert np.array_equal(again.train.images.numpy(), data.train.images.numpy())
    print(f"\n[real data] folder reader, 60,000 JPEGs: first start (decode) {first:.1f} s, second (cache) {second:.1f} s")

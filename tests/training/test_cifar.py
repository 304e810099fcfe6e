"""cifar.py: the batch files are read with a restricted unpickler; labels, empty batches and data_dir are checked."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cutmix_pl import cifar

from conftest import make_tiny_cifar


class WritesAMarker:
    """Unpickling this calls os.system: what a crafted batch file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpensAMarker:
    """Unpickling this calls builtins.exec, which writes a file: the other usual route."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tiny_cifar(tmp_path / "data", n_train=50, n_test=20)


def rewrite(data: Path, name: str, entry: object) -> Path:
    path = data / cifar.FOLDER / name
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    return path


@pytest.mark.parametrize("payload,named", [(WritesAMarker, f"{os.system.__module__}.system"),  # posix on Linux
                                           (OpensAMarker, "builtins.exec")])
def test_a_crafted_pickle_runs_no_code(payload, named, data, tmp_path):
    marker = tmp_path / "ran"
    path = rewrite(data, "data_batch_1", {"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 10,
                                          "payload": payload(marker)})
    with pytest.raises(cifar.DataError) as err:
        cifar.load(data)
    assert not marker.exists(), "the crafted file ran code"
    msg = str(err.value)
    assert f"{path} is not a CIFAR-10 batch and was not loaded: it refers to {named}," in msg
    assert f"fix: delete {path.parent} and fetch or rebuild it" in msg and "\n" not in msg
    # the same file through plain pickle does run it: the test's payload is real
    with open(path, "rb") as f:
        pickle.load(f, encoding="latin1")
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_every_pickle_protocol_of_a_plain_batch_loads(protocol, data):
    """Protocol 2 writes bytes through _codecs.encode, 5 arrays through _frombuffer: both are on the list."""
    entry = {"data": np.full((10, 3072), 7, np.uint8), "labels": list(range(10)), b"batch_label": b"x",
             "filenames": [f"{i}.png" for i in range(10)]}
    path = data / cifar.FOLDER / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=protocol)
    batch = cifar._read_batch(path)
    assert batch.labels.tolist() == list(range(10)) and int(batch.images.sum()) == 7 * 10 * 3072


def test_files_from_both_writers_load(data, real_cifar):
    train, test = cifar.load(data)  # write_batches (the tests' synthetic copy)
    assert train.images.shape == (50, 3, 32, 32) and test.labels.dtype.is_floating_point is False
    batch = cifar._read_batch(Path(real_cifar) / cifar.FOLDER / "test_batch")  # ../shared/data/make_cifar10.py
    assert batch.images.shape == (10000, 3, 32, 32) and int(batch.labels.max()) == 9


@pytest.mark.parametrize("labels,shown", [
    ([3.7] * 10, "3.7 of type float"),
    ([3.0] * 10, "3.0 of type float"),
    (["3"] * 10, "'3' of type str"),
    ([True] * 10, "True of type bool"),
    (np.full(10, 2.0), "2.0 of type float"),
])
def test_labels_must_be_integer_class_indices(labels, shown, data):
    path = rewrite(data, "data_batch_2", {"data": np.zeros((10, 3072), np.uint8), "labels": labels})
    with pytest.raises(cifar.DataError, match=f"{path} has a label {shown}: labels are integer class indices"):
        cifar.load(data)


def test_numpy_integer_labels_are_fine(data):
    rewrite(data, "data_batch_2", {"data": np.zeros((10, 3072), np.uint8), "labels": np.arange(10)})
    train, _ = cifar.load(data)
    assert train.labels.tolist().count(9) >= 1


def test_an_empty_split_is_an_error_at_load_time(data):
    path = rewrite(data, "test_batch", {"data": np.zeros((0, 3072), np.uint8), "labels": []})
    with pytest.raises(cifar.DataError, match=f"{path} holds no images; fix: delete"):
        cifar.load(data)


def test_data_dir_that_is_a_file(tmp_path):
    notes = tmp_path / "README.md"
    notes.write_text("not data")
    for call in (lambda: cifar.load(notes), lambda: cifar.download(notes), lambda: cifar.find(notes / "sub")):
        with pytest.raises(cifar.DataError) as err:
            call()
        msg = str(err.value)
        assert f"{notes} is a file, not a folder" in msg and "fix: pass the folder" in msg and "\n" not in msg
        assert "downloading" not in msg
    assert notes.read_text() == "not data"


def test_a_batches_folder_that_is_a_file(tmp_path):
    (tmp_path / cifar.FOLDER).write_text("not data")
    for call in (lambda: cifar.load(tmp_path, download_if_missing=True), lambda: cifar.download(tmp_path)):
        with pytest.raises(cifar.DataError) as err:
            call()
        msg = str(err.value)
        assert f"{tmp_path / cifar.FOLDER} is a file, not a folder; fix: delete it" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [cifar.FOLDER], "nothing fetched or written"

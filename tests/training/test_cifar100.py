"""cifar100.py and the cifar100 reader, on synthetic files in the official layout and key names (no copy of
CIFAR-100 is reachable here); the download path against an archive served by a loopback HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import os
import pickle
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from cutmix_pl import cifar100
from cutmix_pl.augment import CutMix
from cutmix_pl.data import CIFAR10DataModule
from cutmix_pl.dataset import DataError

FINE = [f"fine{i:02d}" for i in range(100)]
COARSE = [f"coarse{i:02d}" for i in range(20)]


def make_tiny_cifar100(root: Path, n_train: int = 400, n_test: int = 100, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)

    def part(n: int) -> tuple:
        fine = rng.integers(0, 100, n)
        return rng.integers(0, 256, (n, 3072), dtype=np.uint8), fine.tolist(), (fine // 5).tolist()

    cifar100.write_files(root, part(n_train), part(n_test), FINE, COARSE)
    return root


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tiny_cifar100(tmp_path / "data")


def test_the_official_key_names_are_what_is_written(data):
    with open(data / cifar100.FOLDER / "train", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert set(entry) == {"filenames", "batch_label", "fine_labels", "coarse_labels", "data"}
    with open(data / cifar100.FOLDER / "meta", "rb") as f:
        assert set(pickle.load(f, encoding="latin1")) == {"fine_label_names", "coarse_label_names"}


@pytest.mark.parametrize("labels,k,names", [("fine", 100, FINE), ("coarse", 20, COARSE)])
def test_reads_fine_or_coarse_labels_and_their_names(data, labels, k, names):
    train, test, classes = cifar100.load(data, labels)
    assert train.images.shape == (400, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.labels.shape == (100,) and int(train.labels.max()) < k and classes == tuple(names)
    with open(data / cifar100.FOLDER / "train", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert train.labels.tolist() == entry[f"{labels}_labels"]
    assert torch.equal(train.images.reshape(400, -1), torch.from_numpy(entry["data"]))


def test_the_datamodule_follows_the_dataset(data):
    dm = CIFAR10DataModule(data, download=False, dataset="cifar100", val_size=50, batch_size=32,
                           mixer=CutMix(alpha=1.0, num_classes=100))
    assert dm.num_classes == 100 and dm.classes == tuple(FINE) and dm.image_size == (32, 32)
    assert dm.mean == cifar100.MEAN and dm.std == cifar100.STD
    dm.setup("fit")
    assert len(dm.split("train").labels) == 350 and len(dm.split("val").labels) == 50
    images, labels = next(iter(dm.train_dataloader()))
    assert dm.transform(images, labels, 0, torch.Generator().manual_seed(0)).targets.shape == (32, 100)
    coarse = CIFAR10DataModule(data, download=False, dataset="cifar100", cifar100_labels="coarse", mixer=None)
    assert coarse.num_classes == 20 and coarse.classes == tuple(COARSE)


def test_a_mixer_of_another_class_count_is_refused_with_the_fix(data):
    with pytest.raises(ValueError, match=r"^data.mixer.num_classes=10 does not match the 100 classes of cifar100 "
                                         r"\(fine labels\); fix: data.mixer.init_args.num_classes 100, or leave it "
                                         r"null \(the data's\)$") as err:
        CIFAR10DataModule(data, download=False, dataset="cifar100", mixer=CutMix(num_classes=10))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^data.cifar100_labels='medium' is not allowed"):
        CIFAR10DataModule(data, dataset="cifar100", cifar100_labels="medium", mixer=None)
    with pytest.raises(ValueError, match=r"^data.image_size=64 does not apply to cifar100"):
        CIFAR10DataModule(data, dataset="cifar100", image_size=64, mixer=None)


def test_a_mixer_left_without_num_classes_takes_the_datasets(data, tmp_path):
    from cutmix_pl.augment import CutMixUp

    dm = CIFAR10DataModule(data, download=False, dataset="cifar100", val_size=50, batch_size=32)  # the default CutMix
    assert isinstance(dm.mixer, CutMix) and dm.mixer.num_classes == 100
    assert dm.hparams["mixer"].startswith("CutMix(alpha=1.0, prob=0.5, num_classes=100,")
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert dm.transform(images, labels, 0, torch.Generator().manual_seed(0)).targets.shape == (32, 100)
    mixup = CIFAR10DataModule(data, download=False, dataset="cifar100", mixer=CutMixUp()).mixer
    assert (mixup.num_classes, mixup.cutmix.num_classes, mixup.mixup.num_classes) == (100, 100, 100)
    mine = CutMix(alpha=1.0)
    coarse = CIFAR10DataModule(data, download=False, dataset="cifar100", cifar100_labels="coarse", mixer=mine)
    assert coarse.mixer.num_classes == 20 and mine.num_classes is None  # the mixer given is left as it was
    # the DataModule's default mixer is one object for every DataModule: CIFAR-10's still gets 10
    assert CIFAR10DataModule(tmp_path / "cifar10", download=False).mixer.num_classes == 10


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_runs_no_code(data, tmp_path):
    path, marker = data / cifar100.FOLDER / "test", tmp_path / "ran"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1], "x": RunsCode(marker)}, f)
    with pytest.raises(DataError, match=rf"^{path} is not a CIFAR-100 file and was not loaded: it refers to "
                                        r".*system, which CIFAR-100 files never do"):
        cifar100.load(data)
    assert not marker.exists()


@pytest.mark.parametrize("entry,shown", [
    ({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]}, "fine_labels outside [0, 99]"),
    ({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0.0, 1.0]}, "a label 0.0 of type float"),
    ({"data": np.zeros((2, 3072), np.uint8), "coarse_labels": [0, 1]},
     "no labels under 'fine_labels', not one for each of its 2 images"),
    ({"data": np.zeros((2, 1024), np.uint8), "fine_labels": [0, 1]}, "shape [2, 1024]"),
    ([1, 2], "holds a list"),
])
def test_damaged_files_are_one_line(data, entry, shown):
    path = data / cifar100.FOLDER / "train"
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    with pytest.raises(DataError) as err:
        cifar100.load(data)
    msg = str(err.value)
    assert msg.startswith(str(path)) and shown in msg and "fix: delete" in msg and "\n" not in msg


def test_missing_data_offline_is_one_clear_line(tmp_path):
    with pytest.raises(DataError) as err:
        cifar100.load(tmp_path / "nowhere")
    msg = str(err.value)
    assert "\n" not in msg and "--data.download true" in msg and "cifar-100-python" in msg


# -- download: the official routine (torchvision's), against a copy served from this machine --------------------
@pytest.fixture
def served(tmp_path: Path):
    """An archive of a tiny CIFAR-100 in the official layout, served over http from a loopback server."""
    src = make_tiny_cifar100(tmp_path / "src", n_train=40, n_test=10)
    site = tmp_path / "site"
    site.mkdir()
    archive = site / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / cifar100.FOLDER, arcname=cifar100.FOLDER)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{archive.name}", hashlib.md5(archive.read_bytes()).hexdigest()
    server.shutdown()


def test_download_checks_md5_and_extracts(served, tmp_path, monkeypatch):
    url, md5 = served
    monkeypatch.setattr(cifar100, "ARCHIVE_MD5", md5)  # the synthetic archive's, in place of the official one
    folder = cifar100.download(tmp_path / "fresh", url=url)
    assert folder == tmp_path / "fresh" / cifar100.FOLDER
    train, test, classes = cifar100.load(tmp_path / "fresh")
    assert len(train.labels) == 40 and len(test.labels) == 10 and classes == tuple(FINE)


def test_an_archive_with_another_md5_is_refused_and_removed(served, tmp_path):
    url, _ = served  # the official md5 cannot match the synthetic archive
    with pytest.raises(DataError) as err:
        cifar100.download(tmp_path / "fresh", url=url)
    msg = str(err.value)
    assert "downloading it failed" in msg and "fix:" in msg and "\n" not in msg
    assert "run again where the internet is reachable" in msg and "--data.download true" not in msg  # it was true
    assert not (tmp_path / "fresh").exists(), "a failed download must leave no partial archive or folder"


def test_prepare_data_downloads_when_allowed(served, tmp_path, monkeypatch):
    url, md5 = served
    monkeypatch.setattr(cifar100, "ARCHIVE_MD5", md5)
    monkeypatch.setattr(cifar100, "URL", url)
    monkeypatch.setattr(cifar100.download, "__defaults__", (url,))
    dm = CIFAR10DataModule(tmp_path / "d", dataset="cifar100", mixer=None, val_size=5, batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.split("train").labels) == 35 and dm.classes == tuple(FINE)

"""The folder reader (folder.py, image_cache.py, folder.Folder) on tiny synthetic image folders: layout, decoding,
resizing, the cache, and every bad input in one line with nothing half-written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from cutmix_pl import folder, image_cache, memory
from cutmix_pl.augment import CutMix
from cutmix_pl.data import CIFAR10DataModule
from cutmix_pl.dataset import DataError
from cutmix_pl.folder import Folder

CLASSES = ("cat", "ant", "bee")  # written unsorted: the reader sorts them


def write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_folder(root: Path, n: int = 6, size: tuple[int, int] = (12, 12), ext: str = ".png", seed: int = 0,
                splits: tuple[str, ...] = ("train", "test")) -> Path:
    """PNG (lossless) by default, so decoded pixels can be compared with what was written."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in CLASSES:
            for i in range(n):
                write_image(root / split / c / f"{i:03d}{ext}", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return root


def leftovers(root: Path) -> list[str]:
    """Anything but the image folders: a cache or a temporary file left behind."""
    return sorted(p.name for p in root.iterdir() if p.name not in ("train", "test", "val"))


def dm(root: Path, **kw) -> CIFAR10DataModule:
    kw = {"dataset": "folder", "download": False, "mixer": None, "val_size": 2, "batch_size": 4, **kw}
    return CIFAR10DataModule(root, **kw)


def test_files_name_each_image_of_a_split_in_its_order(tmp_path):
    root = make_folder(tmp_path / "d", n=4)
    module = dm(root)
    module.setup("test")
    test, files = module.split("test"), module.reader.files("test")
    assert len(files) == len(test.labels) == 12 and module.reader.files("val") is None
    for i, name in enumerate(files):  # the file's pixels are the image at its position, its folder the label
        pixels = np.asarray(Image.open(root / name)).transpose(2, 0, 1).copy()
        assert torch.equal(test.images[i], torch.from_numpy(pixels))
        assert name.split("/")[1] == module.classes[test.labels[i]]
    assert CIFAR10DataModule(tmp_path / "none", download=False).reader.files("test") is None


def test_classes_sorted_labels_and_pixels(tmp_path):
    root = make_folder(tmp_path / "d")
    module = dm(root)
    assert module.classes == ("ant", "bee", "cat") and module.num_classes == 3
    module.setup("test")
    test = module.split("test")
    assert test.images.shape == (18, 3, 12, 12) and test.images.dtype == torch.uint8
    assert test.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    expected = np.asarray(Image.open(root / "test" / "ant" / "000.png")).transpose(2, 0, 1).copy()
    assert torch.equal(test.images[0], torch.from_numpy(expected))
    assert module.image_size == (12, 12)


def test_mean_and_std_are_computed_once_stored_and_used(tmp_path):
    root = make_folder(tmp_path / "d")
    module = dm(root, val_size=0)
    module.setup("fit")
    train = torch.cat([module.split("train").images])
    x = train.double() / 255
    torch.testing.assert_close(torch.tensor(module.mean, dtype=torch.float64), x.mean((0, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(module.std, dtype=torch.float64), x.std((0, 2, 3), correction=0),
                               atol=1e-5, rtol=0)
    meta = image_cache.read_meta(image_cache.cache_path(root, None))
    assert tuple(meta["mean"]) == module.mean and meta["classes"] == ["ant", "bee", "cat"]
    images, labels = module.split("test").images[:4], module.split("test").labels[:4]
    x, _ = module.on_after_batch_transfer((images, labels), 0)
    mean, std = torch.tensor(module.mean).view(1, 3, 1, 1), torch.tensor(module.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std)


def test_a_val_size_of_every_training_image_is_refused_before_any_decoding(tmp_path):
    root = make_folder(tmp_path / "d", n=4)  # 12 training images
    with pytest.raises(ValueError, match=r"^data.val_size=12 is out of range: it must lie in \[0, 11\] \(folder ") as e:
        dm(root, val_size=12)
    assert "fix: pass --data.val_size in that range (e.g. 1), or 0 " in str(e.value)  # an example inside the range
    assert leftovers(root) == []  # refused at construction: no cache decoded
    assert len(dm(root, val_size=11).reader.listing.files["train"]) == 12


def test_a_val_folder_is_the_validation_split(tmp_path):
    root = make_folder(tmp_path / "d", splits=("train", "val", "test"), n=4)
    module = dm(root, val_size=5000)  # not used: val/ is the validation split, and all of train/ trains
    module.setup("fit")
    assert len(module.split("train").labels) == 12 and len(module.split("val").labels) == 12


def test_training_batches_mix_with_the_datasets_classes(tmp_path):
    module = dm(make_folder(tmp_path / "d"), mixer=CutMix(alpha=1.0, num_classes=3))
    module.setup("fit")
    images, labels = next(iter(module.train_dataloader()))
    assert module.transform(images, labels, 0, torch.Generator().manual_seed(0)).targets.shape == (4, 3)
    assert dm(tmp_path / "d", mixer=CutMix()).mixer.num_classes == 3  # null: the data's
    with pytest.raises(ValueError, match=r"^data.mixer.num_classes=10 does not match the 3 classes of folder \(3 "
                                         r"classes: ant, bee, cat\); fix: data.mixer.init_args.num_classes 3, or "
                                         r"leave it null \(the data's\)$"):
        dm(tmp_path / "d", mixer=CutMix(num_classes=10))


def test_the_second_start_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d")
    first = dm(root)
    first.prepare_data()
    assert leftovers(root) == ["cutmix_pl-cache-native.npz"]
    first.setup("fit")
    monkeypatch.setattr(folder, "_open", lambda *a: pytest.fail("decoded again"))
    second = dm(root)
    second.prepare_data()
    second.setup("fit")
    for name in ("train", "val", "test"):
        assert torch.equal(first.split(name).images, second.split(name).images)
    assert second.mean == first.mean


def test_a_start_stats_the_images_once(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d")
    passes = []
    real = folder.Listing.fingerprint
    monkeypatch.setattr(folder.Listing, "fingerprint", lambda self, size: passes.append(1) or real(self, size))
    for start in ("decodes", "reads the cache"):
        passes.clear()
        data = dm(root)
        data.prepare_data()
        data.setup("fit")
        assert len(passes) == 1, start


def test_the_cache_is_loaded_without_unpickling(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d")
    dm(root).prepare_data()
    calls = []
    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: calls.append(k.get("allow_pickle")) or real(*a, **k))
    dm(root).setup("test")
    assert calls and all(flag is False for flag in calls)


def test_image_size_resizes_once_and_has_its_own_cache(tmp_path):
    root = tmp_path / "d"
    make_folder(root, size=(20, 30), ext=".jpg")
    make_folder(root, size=(40, 16), ext=".png", seed=1)  # the same names, another format: both are images
    module = dm(root, image_size=16, cache_dir=str(tmp_path / "cache"))
    module.setup("test")
    assert module.split("test").images.shape == (36, 3, 16, 16) and module.image_size == (16, 16)
    assert (tmp_path / "cache" / "cutmix_pl-cache-16.npz").is_file() and leftovers(root) == []


@pytest.mark.skipif(not features.check("webp"), reason="this Pillow has no WebP")
def test_webp_is_read(tmp_path):
    root = make_folder(tmp_path / "d", ext=".webp")
    module = dm(root)
    module.setup("test")
    assert module.split("test").images.shape == (18, 3, 12, 12)


def test_a_16_bit_greyscale_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    root = make_folder(tmp_path / "d", n=1)
    grey = np.arange(144, dtype=np.uint16).reshape(12, 12) * 455  # 0 to 65065: all but the first above 255
    path = root / "test" / "ant" / "000.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")  # Pillow opens it as 16-bit integers
    module = dm(root, val_size=0)
    module.setup("test")
    expected = torch.from_numpy(np.rint(grey / 257).astype(np.uint8))  # v * 255 / 65535, rounded
    assert torch.equal(module.split("test").images[0], expected.expand(3, 12, 12))  # grey in every channel


# -- bad input: one line each, nothing half-written ----------------------------------------------------------
def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "fix:" in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


def test_an_empty_class_folder(tmp_path):
    root = make_folder(tmp_path / "d")
    for f in (root / "test" / "bee").iterdir():
        f.unlink()
    with pytest.raises(DataError) as err:
        dm(root)
    one_line(err, f"the class folder {root / 'test' / 'bee'} is empty")
    assert leftovers(root) == []


@pytest.mark.parametrize("name,content,shown", [
    ("notes.txt", b"not an image", "is not an image by its name"),
    ("fake.jpg", b"not an image at all", "is not an image Pillow can read"),
])
def test_a_file_that_is_not_an_image(tmp_path, name, content, shown):
    root = make_folder(tmp_path / "d")
    (root / "train" / "ant" / name).write_bytes(content)
    with pytest.raises(DataError) as err:
        dm(root).setup("fit")
    one_line(err, str(root / "train" / "ant" / name), shown)
    assert leftovers(root) == []


def test_a_corrupt_jpeg(tmp_path):
    root = make_folder(tmp_path / "d", ext=".jpg", size=(64, 64))
    path = root / "test" / "cat" / "003.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError) as err:
        dm(root).prepare_data()
    one_line(err, f"{path} is a damaged image", "truncated")
    assert leftovers(root) == []


@pytest.mark.parametrize("change,shown", [
    (lambda root: (root / "test" / "bee").rename(root / "test" / "wasp"), "only here ['wasp'], missing here ['bee']"),
    (lambda root: os.makedirs(root / "test" / "dog"), "only here ['dog']"),
])
def test_train_and_test_with_different_classes(tmp_path, change, shown):
    root = make_folder(tmp_path / "d")
    change(root)
    with pytest.raises(DataError) as err:
        dm(root)
    one_line(err, f"{root / 'test'} has other classes than train/", shown)


def test_mixed_sizes_without_image_size(tmp_path):
    root = make_folder(tmp_path / "d")
    write_image(root / "train" / "bee" / "big.png", np.zeros((14, 15, 3), np.uint8))
    with pytest.raises(DataError) as err:
        dm(root).prepare_data()
    one_line(err, "big.png is 15x14", "is 12x12", "fix: pass --data.image_size N")
    assert leftovers(root) == []
    module = dm(root, image_size=12)  # the fix works
    module.setup("fit")


def test_an_unreadable_file(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "train" / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # unreadable whoever runs the test
    with pytest.raises(DataError) as err:
        dm(root).prepare_data()
    one_line(err, f"{root / 'train' / 'cat' / 'gone.png'} cannot be read")
    assert leftovers(root) == []


def test_a_cache_from_other_files_is_refused(tmp_path):
    root = make_folder(tmp_path / "d")
    dm(root).prepare_data()
    write_image(root / "train" / "ant" / "new.png", np.zeros((12, 12, 3), np.uint8))
    for call in (lambda: dm(root).prepare_data(), lambda: dm(root).setup("fit")):
        with pytest.raises(DataError) as err:
            call()
        one_line(err, "was made from other files than", "(36 files then, 37 now; changed: train/ant)", "fix: delete it")
    (root / "train" / "ant" / "new.png").unlink()
    path = root / "train" / "ant" / "000.png"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the same names, one file touched
    with pytest.raises(DataError) as err:
        dm(root).setup("fit")
    one_line(err, "as many files, but names, sizes or modification times differ; changed: train/ant)")
    for split, c in (("train", "bee"), ("train", "cat"), ("test", "cat"), ("test", "bee")):  # 5 folders in all
        write_image(root / split / c / "001.png", np.zeros((12, 12, 3), np.uint8))
    with pytest.raises(DataError) as err:
        dm(root).setup("fit")
    one_line(err, "; changed: test/bee, test/cat, train/ant, train/bee and 1 more)")


def test_a_damaged_cache(tmp_path):
    root = make_folder(tmp_path / "d")
    dm(root).prepare_data()
    cache = image_cache.cache_path(root, None)
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.raises(DataError) as err:
        dm(root).setup("fit")
    one_line(err, f"the image cache {cache} is damaged", "fix: delete it")


def test_an_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d")

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stop)
    with pytest.raises(KeyboardInterrupt):
        dm(root).prepare_data()
    assert leftovers(root) == []


def test_a_dataset_that_cannot_fit_is_refused_before_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    monkeypatch.setattr(folder, "_open", lambda *a: pytest.fail("decoded"))
    with pytest.raises(ValueError) as err:
        dm(root).prepare_data()
    msg = one_line(err, "takes 0.00 GiB as uint8 at 12x12", "0.00 GiB free", "fix: a smaller --data.image_size")
    assert "docs/design.md" in msg and leftovers(root) == []
    with pytest.raises(ValueError, match="must be held on the host"):
        dm(root).setup("test")


def test_the_estimate_is_the_bytes_read(tmp_path):
    root = make_folder(tmp_path / "d")
    reader = Folder(root, None)
    estimate = reader.nbytes()
    data = reader.read()
    assert estimate == sum(s.images.numel() for s in (data.train, data.test)) == reader.nbytes()


@pytest.mark.parametrize("layout,shown", [
    (lambda root: None, "has no train/ folder"),
    (lambda root: os.makedirs(root / "train" / "only"), "has 1 class folder(s)"),
])
def test_a_root_without_the_layout(tmp_path, layout, shown):
    root = tmp_path / "d"
    root.mkdir()
    (root / "test").mkdir()
    layout(root)
    with pytest.raises(DataError) as err:
        dm(root)
    one_line(err, shown)


@pytest.mark.parametrize("value", [0, 7, 5000, True, 2.5])
def test_image_size_out_of_range(tmp_path, value):
    with pytest.raises(ValueError, match=rf"^data.image_size={value!r} is out of range: it must be an integer in "
                                         r"\[8, 4096\] or null"):
        dm(make_folder(tmp_path / "d", n=1), image_size=value)

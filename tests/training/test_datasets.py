"""What follows the data downstream, for every reader: the class names in the grid captions and the confusion
matrix (in full, whatever their length), no CIFAR-10 constant outside its reader, and a reader of one's own named by
its dotted path, with nothing else changed."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import ImageFont

from cutmix_pl import cifar
from cutmix_pl.data import CIFAR10DataModule
from cutmix_pl.dataset import Reader
from cutmix_pl.readers import find_reader
from cutmix_pl.viz import _text_width, captioned_grid, confusion_image, mix_captions

PACKAGE = Path(__file__).resolve().parents[2] / "cutmix_pl"


# -- no CIFAR-10 literal outside its reader -------------------------------------------------------------------------
def _package_sources() -> dict[str, str]:
    files = sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.rglob("*.yaml"))
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in files}


CIFAR10_ONLY = {
    # a CIFAR-10 class name as a string, or CIFAR-10's constants used outside its reader
    "class name": re.compile(r"""["'](%s)["']""" % "|".join(cifar.CLASSES)),
    "CIFAR-10 constant": re.compile(r"\bcifar\.(CLASSES|MEAN|STD)\b"),
    # a class count of 10 as a default or setting
    "num_classes of 10": re.compile(r"num_classes\s*(:\s*int(\s*\|\s*None)?\s*)?[=:]\s*10\b"),
    # the training-set size
    "50,000": re.compile(r"\b50[_,]?000\b"),
}
OWN_FACTS = {"cifar.py": set(CIFAR10_ONLY), "cifar100.py": {"50,000"}}  # CIFAR-100 has 50,000 training images too


def test_no_cifar10_literal_outside_its_reader():
    found = [f"{name}: {what}: {m.group(0)!r}" for name, text in _package_sources().items()
             for what, pattern in CIFAR10_ONLY.items() if what not in OWN_FACTS.get(name, set())
             for m in pattern.finditer(text)]
    assert found == []


def test_the_literal_check_catches_what_it_looks_for():
    planted = 'def f(num_classes: int = 10):\n    return "automobile", 50_000, cifar.MEAN\n'
    assert {what for what, p in CIFAR10_ONLY.items() if p.search(planted)} == set(CIFAR10_ONLY)


# -- class names in pictures ------------------------------------------------------------------------------------------
def test_captions_name_each_class_in_full_and_a_second_only_when_it_has_weight():
    classes = ("aquarium_fish", "automobile", "sweet_pepper")
    labels, partner = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 0, 0, 2])
    lam = torch.tensor([0.63, 0.999, 1.0, 0.4])
    assert mix_captions(labels, partner, lam, classes) == [
        "aquarium_fish 0.63\n+automobile 0.37",
        "automobile 1.00\n",  # a box of 0.1% area rounds to weight 0.00: not named
        "sweet_pepper 1.00\n",
        "sweet_pepper 1.00\n",  # paired with an image of its own class: one class, all the weight
    ]


def test_grid_tiles_widen_to_the_longest_caption():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    short = captioned_grid(images, ["cat 1.00\n", "dog 1.00\n"], columns=2)
    long = ["aquarium_fish_in_a_bowl 0.51\n+willow_tree_by_a_river 0.49", "dog 1.00\n"]
    wide = captioned_grid(images, long, columns=2)
    assert short.shape[1] == 2 * 32 * 3  # short names: the tiles are the images' width
    assert wide.shape[1] == 2 * (_text_width(long[0], ImageFont.load_default()) + 6) > short.shape[1]


def test_confusion_matrix_rows_carry_full_names_and_grow_with_them():
    k, cell = 12, 34
    matrix = torch.eye(k, dtype=torch.long) * 5
    short = confusion_image(matrix, [f"c{i}" for i in range(k)], cell=cell)
    names = [f"class_with_a_long_name_{i}" for i in range(k)]
    long = confusion_image(matrix, names, cell=cell)
    font = ImageFont.load_default()
    left = max(_text_width(f"{i} {n}", font) for i, n in enumerate(names)) + 8
    assert long.shape[1] >= left + k * cell and long.shape[1] > short.shape[1]
    assert long.shape[0] == short.shape[0] == 16 + k * cell + 14
    # the row labels are drawn in the left margin: dark pixels there on every row
    for i in range(k):
        row = long[16 + i * cell: 16 + (i + 1) * cell, :left - 8]
        assert (row < 128).any()


# -- a reader of one's own: one file, named by its dotted path ----------------------------------------------------------
READER = '''
    import torch
    from cutmix_pl.dataset import ImageSet, Reader, Split


    class Stripes(Reader):
        """Two classes: horizontal or vertical stripes, 16x16."""

        name, classes, train_images = "stripes", ("horizontal", "vertical"), 40

        def __init__(self, data_dir, image_size):
            self.data_dir = data_dir

        @property
        def image_size(self):
            return 16, 16

        def nbytes(self):
            return 60 * 3 * 16 * 16

        def _split(self, n):
            labels = torch.arange(n) % 2
            rows = (torch.arange(16) % 4 < 2).to(torch.uint8) * 255
            h = rows[:, None].expand(16, 16)
            images = torch.stack([h if y == 0 else h.T for y in labels.tolist()])[:, None].expand(n, 3, 16, 16)
            return Split(images.contiguous(), labels)

        def read(self):
            return ImageSet(self._split(40), self._split(20), None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
'''


@pytest.fixture
def own_reader(tmp_path, monkeypatch):
    (tmp_path / "my_stripes.py").write_text(textwrap.dedent(READER))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_stripes.Stripes"
    sys.modules.pop("my_stripes", None)
    Reader.registry.pop("stripes", None)


def test_a_reader_of_ones_own_is_named_by_its_dotted_path(own_reader):
    dm = CIFAR10DataModule(dataset=own_reader, val_size=10, batch_size=8, eval_batch_size=10)
    assert dm.classes == ("horizontal", "vertical") and dm.num_classes == 2 and dm.mixer.num_classes == 2
    dm.setup("fit")
    train, val = dm.split("train"), dm.split("val")
    assert train.images.shape == (30, 3, 16, 16) and len(val.labels) == 10
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (8, 3, 16, 16)
    assert find_reader("stripes").__name__ == "Stripes"  # registered once imported


def test_an_unknown_dataset_is_refused_in_one_line_naming_the_choices():
    with pytest.raises(ValueError) as err:
        CIFAR10DataModule(dataset="imagenet")
    msg = str(err.value)
    assert "\n" not in msg and "data.dataset='imagenet'" in msg
    assert all(name in msg for name in ("cifar10", "cifar100", "folder")) and "dotted path" in msg
    with pytest.raises(ValueError, match="dotted path"):
        CIFAR10DataModule(dataset="torch.nn.Linear")  # a class, but not a Reader

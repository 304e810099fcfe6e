"""Cutout (DeVries & Taylor 2017, arXiv:1708.04552): against the paper's code, and as a batch augmentation in the
``data.mixer`` slot.

The statistics follow tests/training/test_augment_stats.py: our samples are read off the pixels of ``.mix()`` (a
pixel is in the hole when it became 0; no input pixel is 0); the reference is an independent NumPy re-implementation of
the authors' ``Cutout.__call__`` (uoguelph-mlrg/Cutout, ``util/cutout.py``), written from that code, not from ours.
Fixed seeds make every test deterministic; ``P_MIN`` = 1e-3 would flag a correct implementation one time in a
thousand if the seeds were random. The hole's area is discrete, for which the KS test is conservative (ties make p
larger). The negative controls show the same tests rejecting plausible wrong implementations, so they can fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from cli_runs import fails, small
from cutmix_pl import cifar
from cutmix_pl.augment import Cutout, normalize, random_crop_flip
from cutmix_pl.cli import main
from cutmix_pl.data import CIFAR10DataModule
from cutmix_pl.transform import TrainTransform
from cutmix_pl.viz import mix_captions

stats = pytest.importorskip("scipy.stats")

N = 20_000  # images per distribution
SIDE = 32  # CIFAR image side
P_MIN = 1e-3
K = 10  # classes of the labels here: a Cutout used on its own is told them


# -- the independent reference (NumPy) --------------------------------------------------------------------
def paper_mask(h: int, w: int, length: int, rng: np.random.RandomState, n_holes: int = 1) -> np.ndarray:
    """The mask of ``Cutout.__call__`` in uoguelph-mlrg/Cutout (util/cutout.py), line for line; the image is then
    multiplied by it, after normalisation."""
    mask = np.ones((h, w), np.float32)
    for n in range(n_holes):
        y = rng.randint(h)
        x = rng.randint(w)
        y1 = np.clip(y - length // 2, 0, h)
        y2 = np.clip(y + length // 2, 0, h)
        x1 = np.clip(x - length // 2, 0, w)
        x2 = np.clip(x + length // 2, 0, w)
        mask[y1:y2, x1:x2] = 0.0
    return mask


def paper_hole_fraction(length: int, n: int = N, h: int = SIDE, w: int = SIDE, seed: int = 12345) -> np.ndarray:
    """The share of the image the reference code cuts out, for n images (counted in float64, as ours)."""
    rng = np.random.RandomState(seed)
    return np.array([(paper_mask(h, w, length, rng) == 0).sum() for _ in range(n)]) / (h * w)


def box_mask(h: int, w: int, y: int, x: int, length: int) -> np.ndarray:
    """The reference code's hole for a given centre (its clipped box, as a bool mask)."""
    mask = np.zeros((h, w), bool)
    mask[np.clip(y - length // 2, 0, h):np.clip(y + length // 2, 0, h),
         np.clip(x - length // 2, 0, w):np.clip(x + length // 2, 0, w)] = True
    return mask


# -- what our code does, read off its output --------------------------------------------------------------
def holes(cutout: Cutout, n: int = N, h: int = SIDE, w: int = SIDE, chunk: int = 2500, seed: int = 0) -> torch.Tensor:
    """The holes of n images as bool [n, H, W], from the pixels ``.mix()`` returns; checks on the way that a hole is
    zero in every channel, that nothing else changed and that the labels stay hard."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        images = torch.arange(1.0, 2 * m + 1).view(m, 2, 1, 1).expand(m, 2, h, w).contiguous()  # never 0
        labels = torch.arange(m) % 10
        mixed = cutout.mix(images, labels, gen)
        zero = mixed.images == 0
        assert torch.equal(zero[:, 0], zero[:, 1]), "a hole takes every channel"
        assert torch.equal(torch.where(zero, images, mixed.images), images), "outside the hole nothing changes"
        assert torch.equal(mixed.targets, F.one_hot(labels, 10).float())
        out.append(zero[:, 0])
    return torch.cat(out)


def extents(hole: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each image's hole as its row range [y1, y2) and column range [x1, x2); checks it is one rectangle."""
    rows, cols = hole.any(2), hole.any(1)
    assert torch.equal(hole, rows[:, :, None] & cols[:, None, :]), "a hole is one axis-aligned rectangle"

    def span(on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = on.int().argmax(1)
        last = on.shape[1] - on.flip(1).int().argmax(1)
        return first, last

    return (*span(rows), *span(cols))


def centres(hole: torch.Tensor, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The hole centres (cy, cx) recovered from the pixels, for an even side smaller than the image's: a hole clipped
    at the top or left starts at 0 and ends at c + length/2, any other starts at c - length/2."""
    y1, y2, x1, x2 = extents(hole)
    cy = torch.where(y1 > 0, y1 + length // 2, y2 - length // 2)
    cx = torch.where(x1 > 0, x1 + length // 2, x2 - length // 2)
    return cy.numpy(), cx.numpy()


def chi2_uniform_p(values: np.ndarray, bins: int) -> float:
    """Chi-square test of integer values against the uniform law on {0, ..., bins - 1}; a value outside is a miss."""
    if values.min() < 0 or values.max() >= bins:
        return 0.0
    return float(stats.chisquare(np.bincount(values, minlength=bins)).pvalue)


def ks_p(a: np.ndarray, b: np.ndarray) -> float:
    return float(stats.ks_2samp(a, b).pvalue)


# -- plausible wrong implementations, for the negative controls ---------------------------------------------
class _HoleInside(Cutout):
    """The centre drawn so that the hole always fits in the image: never clipped, always size x size."""

    def _draw(self, n, height, width, device, generator):
        half = self.size // 2
        y = torch.randint(half, height - half + 1, (1, n), generator=generator)
        x = torch.randint(half, width - half + 1, (1, n), generator=generator)
        return {"centre": torch.cat([y, x]).float(), "coin": None}


class _CornerUniform(Cutout):
    """The top-left corner (not the centre) uniform over the pixels, the box clipped at the bottom and right."""

    def _draw(self, n, height, width, device, generator):
        centre = super()._draw(n, height, width, device, generator)["centre"] + self.size // 2
        return {"centre": centre, "coin": None}


# -- against the paper ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, h, w", [(16, 32, 32), (8, 32, 32), (8, 24, 32)])
def test_hole_centre_is_uniform_over_the_image(size, h, w):
    """The centres read off the pixels of 20,000 images: uniform over the rows, the columns and the pixels (chi-square
    against the uniform law); 16 is the paper's CIFAR-10 side, 8 its CIFAR-100 one; 24 x 32 takes the code path of a
    non-square image."""
    cy, cx = centres(holes(Cutout(size=size, num_classes=K), h=h, w=w), size)
    assert chi2_uniform_p(cy, h) > P_MIN and chi2_uniform_p(cx, w) > P_MIN
    assert chi2_uniform_p(cy * w + cx, h * w) > P_MIN  # jointly: about 20 a pixel
    assert np.corrcoef(cy, cx)[0, 1] == pytest.approx(0.0, abs=0.03)  # independent axes (sd of r ~ 0.007)


@pytest.mark.parametrize("size, h, w", [(16, 32, 32), (8, 32, 32), (40, 32, 32), (16, 24, 32)])
def test_clipped_area_matches_the_papers_code(size, h, w):
    """The hole's area as a fraction of the image, 20,000 images, against the reference code's (two-sample KS).
    Holes near the border are clipped, so the area spreads below size^2; 40 is larger than the image, clipped too."""
    hole = holes(Cutout(size=size, num_classes=K), h=h, w=w)
    area = hole.sum((1, 2)).numpy() / (h * w)
    reference = paper_hole_fraction(size, h=h, w=w)
    assert ks_p(area, reference) > P_MIN
    assert area.mean() == pytest.approx(reference.mean(), abs=0.005)  # sd of the mean ~ 0.0006
    assert area.max() == reference.max() == min(size, h) * min(size, w) / (h * w)
    assert (area < area.max()).mean() > 0.3, "many holes are clipped"


@pytest.mark.parametrize("size, h, w", [(16, 32, 32), (8, 24, 32), (2, 32, 32), (40, 32, 32), (64, 32, 32)])
def test_each_hole_is_the_reference_codes_box_around_its_drawn_centre(size, h, w):
    """Image by image, exactly: the hole is the reference code's clipped box for the centre drawn (and 64, twice the
    side, blanks every image whole)."""
    cutout = Cutout(size=size, num_classes=K)
    images = torch.rand(64, 3, h, w, generator=torch.Generator().manual_seed(1)) + 0.5
    draws = cutout.draw(images, torch.Generator().manual_seed(2))
    out = cutout.apply(images, torch.arange(64) % 10, draws)
    cy, cx = draws["centre"].long().numpy()
    assert cy.min() >= 0 and cy.max() < h and cx.min() >= 0 and cx.max() < w
    for i in range(64):
        expected = box_mask(h, w, cy[i], cx[i], size)
        assert np.array_equal((out.images[i] == 0).all(0).numpy(), expected), i
    if size >= 2 * max(h, w):
        assert (out.images == 0).all()


def test_an_odd_size_gives_a_hole_of_that_side():
    """The reference code cuts [c - size//2, c + size//2), a side of size - 1 for an odd size; ours starts there and
    spans the full size (the same box for even sizes, the only ones the paper uses)."""
    images = torch.ones(2000, 1, 32, 32)
    out = Cutout(size=5, num_classes=K).mix(images, torch.zeros(2000, dtype=torch.long),
                                            torch.Generator().manual_seed(3))
    y1, y2, x1, x2 = extents(out.images[:, 0] == 0)
    inner = (y1 > 0) & (y2 < 32) & (x1 > 0) & (x2 < 32)
    assert inner.float().mean() > 0.6  # (26/32)^2 of the centres leave it whole
    assert ((y2 - y1)[inner] == 5).all() and ((x2 - x1)[inner] == 5).all()
    assert ((y2 - y1) >= 3).all() and ((y2 - y1) <= 5).all()  # clipped at most to the centre and 2 on one side
    hole = Cutout(size=1, num_classes=K).mix(images[:50], torch.zeros(50, dtype=torch.long)).images == 0
    assert (hole.sum((1, 2, 3)) == 1).all(), "size 1: one pixel"


# -- negative controls: the same tests reject wrong implementations -------------------------------------------
@pytest.mark.parametrize("wrong", [_HoleInside, _CornerUniform], ids=["hole-inside", "corner-uniform"])
def test_negative_control_wrong_placements_are_caught(wrong):
    hole = holes(wrong(size=16, num_classes=K))
    cy, cx = centres(hole, 16)
    assert chi2_uniform_p(cy, SIDE) < P_MIN and chi2_uniform_p(cx, SIDE) < P_MIN
    assert ks_p(hole.sum((1, 2)).numpy() / SIDE**2, paper_hole_fraction(16)) < P_MIN


@pytest.mark.parametrize("other", [14, 18])
def test_negative_control_a_reference_of_another_size_is_caught(other):
    area = holes(Cutout(size=16, num_classes=K)).sum((1, 2)).numpy() / SIDE**2
    assert ks_p(area, paper_hole_fraction(other)) < P_MIN


# -- prob and mode ---------------------------------------------------------------------------------------------
def test_prob_is_the_share_of_images_with_a_hole():
    holed = holes(Cutout(size=16, prob=0.3, num_classes=K)).any(2).any(1).numpy()
    k = int(holed.sum())
    assert stats.binomtest(k, N, 0.3).pvalue > P_MIN
    assert stats.binomtest(k, N, 0.33).pvalue < P_MIN  # negative control: 0.03 off is caught (sd ~ 0.003)


def test_prob_zero_changes_nothing_and_prob_one_holes_every_image():
    images = torch.rand(64, 3, 32, 32) + 0.5
    labels = torch.arange(64) % 10
    out = Cutout(prob=0.0, num_classes=K).mix(images, labels)
    assert torch.equal(out.images, images) and torch.equal(out.targets, F.one_hot(labels, 10).float())
    assert (Cutout(prob=1.0, num_classes=K).mix(images, labels).images == 0).flatten(1).any(1).all()


def test_batch_mode_cuts_one_hole_for_the_whole_batch_and_flips_one_coin():
    cutout, gen = Cutout(size=16, prob=0.5, mode="batch", num_classes=K), torch.Generator().manual_seed(4)
    images = torch.rand(6, 3, SIDE, SIDE) + 0.5
    holed, cy = [], []
    for _ in range(1000):
        hole = (cutout.mix(images, torch.arange(6), gen).images == 0).all(1)
        assert (hole == hole[0]).all(), "the same hole in every image"
        holed.append(bool(hole[0].any()))
        if holed[-1]:
            cy.append(centres(hole[:1], 16)[0][0])
    assert stats.binomtest(sum(holed), 1000, 0.5).pvalue > P_MIN
    assert chi2_uniform_p(np.array(cy), SIDE) > P_MIN  # ~16 a row


# -- the contract: fill, labels, purity, batch splits ---------------------------------------------------------
def _uint8_batch(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def test_through_the_transform_the_hole_is_exactly_zero_after_normalisation_and_labels_stay_hard():
    """Crop/flip -> normalise -> Cutout: the hole is +0.0 (the dataset mean) in every channel, the rest is the
    normalised crop untouched; the targets are the one-hot labels, every lambda 1, every partner the image itself."""
    images, labels = _uint8_batch(64)
    transform = TrainTransform(Cutout(size=16, prob=0.5, num_classes=K))
    transform.seed(3)
    got = transform(images, labels, epoch=0)
    gen = torch.Generator().manual_seed(3)  # the same steps by hand, from the same stream
    x = normalize(random_crop_flip(images, 4, True, gen), cifar.MEAN, cifar.STD)
    hole = transform.mixer.hole(x, transform.mixer.draw(x, gen)).expand_as(x)
    assert 0.3 < hole.flatten(1).any(1).float().mean() < 0.7  # prob 0.5: both kinds in the batch
    assert (got.images[hole] == 0).all() and not torch.signbit(got.images[hole]).any()
    assert torch.equal(got.images[~hole], x[~hole])
    assert torch.equal(got.targets, F.one_hot(labels, 10).float())
    assert torch.equal(got.labels, labels) and torch.equal(got.partner, labels) and (got.lam == 1).all()
    # the training grid's captions: one class at weight 1, no partner
    assert mix_captions(got.labels[:3], got.partner[:3], got.lam[:3], cifar.CLASSES) == [
        f"{cifar.CLASSES[i]} 1.00\n" for i in labels[:3].tolist()]


def test_soft_labels_pass_through_unchanged_and_the_input_is_untouched():
    images = torch.rand(8, 3, 32, 32)
    soft = torch.softmax(torch.randn(8, 10), -1)
    before = images.clone()
    out = Cutout(num_classes=K).mix(images, soft)
    assert torch.equal(out.targets, soft) and out.targets is not soft
    assert torch.equal(images, before)
    assert torch.equal(out.index, torch.arange(8)) and not out.is_cutmix.any() and (out.lam == 1).all()


def test_weights_describe_the_hole():
    """The Mixer contract's ``keep``: 1 outside the hole, 0 inside, with lambda 1 and nothing pasted."""
    cutout = Cutout(prob=0.5, num_classes=K)
    images = torch.rand(16, 3, 32, 32) + 0.5
    draws = cutout.draw(images, torch.Generator().manual_seed(5))
    keep, lam, pasted = cutout.weights(images, draws)
    assert keep.dtype == images.dtype and keep.shape == (16, 1, 32, 32)
    out = cutout.apply(images, torch.arange(16) % 10, draws)
    assert torch.equal(out.images, images * keep)
    assert (lam == 1).all() and not pasted.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prob, mode", [(1.0, "elem"), (0.5, "elem"), (0.5, "batch")])
def test_the_same_draws_give_the_same_pixels_whatever_the_batch_split(prob, mode, dtype):
    """A batch of 8 with its draws, and the same images and draws as batches of 3 and 5: bit-identical on a CPU. The
    draws are per image (per batch in batch mode), the hole an elementwise fill."""
    cutout = Cutout(size=16, prob=prob, mode=mode, num_classes=K)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(6)).to(dtype)
    labels = torch.arange(8) % 10
    draws = cutout.draw(images, torch.Generator().manual_seed(12))  # both kinds at prob 0.5 (elem)
    whole = cutout.apply(images, labels, draws)
    parts = []
    for lo, hi in ((0, 3), (3, 8)):
        own = slice(lo, hi) if mode == "elem" else slice(None)
        coin = None if draws["coin"] is None else draws["coin"][own]
        part = {"index": torch.arange(hi - lo), "centre": draws["centre"][:, own], "coin": coin}
        parts.append(cutout.apply(images[lo:hi], labels[lo:hi], part))
    assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
    assert torch.equal(torch.cat([p.targets for p in parts]), whole.targets)
    holed = (whole.images == 0).flatten(1).any(1)
    assert whole.images.dtype == dtype and holed.any() and (holed.all() or mode == "elem" and prob < 1)


def test_a_generator_makes_it_reproducible():
    images = torch.rand(32, 3, 32, 32)
    labels = torch.arange(32) % 10
    cutout = Cutout(prob=0.5, num_classes=K)
    a, b, c = (cutout.mix(images, labels, torch.Generator().manual_seed(s)).images for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_odd_batches_and_batch_one():
    for n in (1, 3, 7):
        images = torch.rand(n, 3, 32, 32) + 0.5
        out = Cutout(num_classes=K).mix(images, torch.arange(n) % 10, torch.Generator().manual_seed(n))
        assert out.images.shape == images.shape and out.targets.shape == (n, 10)
        assert (out.images == 0).flatten(1).any(1).all(), "a batch of one is cut too: no partner needed"


@pytest.mark.parametrize("make, pattern", [
    (lambda: Cutout(size=0), r"^size=0 is out of range: it must be an integer >= 1"),
    (lambda: Cutout(size=-16), r"^size=-16 is out of range: it must be an integer >= 1"),
    (lambda: Cutout(size=2.5), r"^size=2\.5 is out of range: .*integer >= 1"),
    (lambda: Cutout(size=True), r"^size=True is out of range"),
    (lambda: Cutout(prob=1.5), r"^prob=1\.5 .*\[0, 1\]"),
    (lambda: Cutout(num_classes=1), r"^num_classes=1 .*>= 2"),
    (lambda: Cutout(mode="pair"), r"^mode='pair' .*'elem', 'batch'"),
])
def test_bad_arguments_fail_in_one_line_naming_the_value_and_the_range(make, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        make()
    assert "\n" not in str(err.value)


@pytest.mark.slow(seconds=15)
def test_the_compiled_transform_cuts_the_same_holes():
    """compile=True: the same draws, labels and holes; the normalisation may differ by one float32 ulp."""
    images, labels = _uint8_batch(64)
    eager = TrainTransform(Cutout(prob=0.5, num_classes=K))
    fused = TrainTransform(Cutout(prob=0.5, num_classes=K), compile=True)
    for t in (eager, fused):
        t.seed(8)
    want, got = eager(images, labels), fused(images, labels)
    assert fused._compiled is not None
    for name in ("targets", "labels", "partner", "lam"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.images == 0, want.images == 0)
    torch.testing.assert_close(got.images, want.images, rtol=0, atol=3e-7)


# -- through the DataModule and the CLI -----------------------------------------------------------------------
def test_the_datamodule_takes_cutout_as_its_mixer(tiny_cifar):
    dm = CIFAR10DataModule(str(tiny_cifar), download=False, mixer=Cutout(size=8, prob=0.5))
    assert dm.hparams["mixer"] == "Cutout(size=8, prob=0.5, num_classes=10, mode='elem')"
    images, labels = _uint8_batch(16)
    batch = dm.transform(images, labels, 0, torch.Generator().manual_seed(0))
    assert torch.equal(batch.targets, F.one_hot(labels, 10).float())
    with pytest.raises(ValueError, match=r"data.mixer.num_classes=100 does not match"):
        CIFAR10DataModule(str(tiny_cifar), download=False, mixer=Cutout(num_classes=100))


def test_the_cutout_recipe_trains_and_its_run_records_the_mixer(tiny_cifar, in_tmp):
    cli = main(["fit", *small(tiny_cifar, trainer__max_epochs=1, trainer__limit_train_batches=2), "--config", "cutout"])
    assert cli.trainer.global_step == 2
    run = in_tmp / "runs" / "cutout" / "version_0"
    assert run.resolve() == Path(cli.trainer.log_dir).resolve()
    mixer = yaml.safe_load((run / "config.yaml").read_text())["data"]["mixer"]
    assert mixer == {"class_path": "cutmix_pl.augment.Cutout",
                     "init_args": {"size": 16, "prob": 1.0, "num_classes": None, "mode": "elem"}}  # the data's
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["datamodule_hyper_parameters"]["mixer"] == "Cutout(size=16, prob=1.0, num_classes=10, mode='elem')"
    assert isinstance(cli.datamodule.mixer, Cutout)


def test_a_bad_size_on_the_command_line_is_one_line_naming_the_key(capsys, in_tmp):
    line = fails(capsys, "fit", "--config", "cutout", "--data.mixer.init_args.size", "0",
                 "--trainer.accelerator", "cpu")
    assert "data.mixer.init_args.size=0 is out of range: it must be an integer >= 1" in line and "fix:" in line
    assert list(in_tmp.iterdir()) == []

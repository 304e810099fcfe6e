"""Mixing options end to end: argument errors, YAML configuration, label smoothing once, the off switch through the
DataModule, per-rank streams and reproducibility under ``seed_everything``."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from cutmix_pl.augment import CutMix, CutMixUp, Cutout, MixUp
from cutmix_pl.data import CIFAR10DataModule, mix_seed
from cutmix_pl.module import ImageClassifier, SoftTargetCrossEntropy
from cutmix_pl.resnet import ResNet
from cutmix_pl.transform import TrainTransform
from ranks import as_rank

K = 10  # classes of the labels here: a mixer used on its own is told them


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


# -- argument errors name the argument and the allowed range ----------------------------------------------
@pytest.mark.parametrize("make, pattern", [
    (lambda: CutMix(alpha=0.0), r"alpha=0\.0 .*> 0"),
    (lambda: CutMix(alpha=-1.0), r"alpha=-1\.0 .*> 0"),
    (lambda: CutMix(alpha=math.nan), r"alpha=nan .*> 0"),
    (lambda: CutMix(alpha=math.inf), r"alpha=inf .*finite"),
    (lambda: MixUp(alpha=0), r"alpha=0 .*> 0"),
    (lambda: CutMix(prob=1.5), r"prob=1\.5 .*\[0, 1\]"),
    (lambda: CutMix(prob=-0.1), r"prob=-0\.1 .*\[0, 1\]"),
    (lambda: MixUp(prob=2), r"prob=2 .*\[0, 1\]"),
    (lambda: CutMixUp(prob=-1.0), r"prob=-1\.0 .*\[0, 1\]"),
    (lambda: CutMixUp(switch_prob=1.01), r"switch_prob=1\.01 .*\[0, 1\]"),
    (lambda: CutMixUp(switch_prob=-0.5), r"switch_prob=-0\.5 .*\[0, 1\]"),
    (lambda: CutMix(num_classes=1), r"num_classes=1 .*>= 2"),
    (lambda: MixUp(num_classes=0), r"num_classes=0 .*>= 2"),
    (lambda: CutMix(num_classes=2.5), r"num_classes=2\.5 .*integer >= 2"),
    (lambda: CutMix(mode="pair"), r"mode='pair' .*'elem', 'batch'"),
    (lambda: CutMix(pairing="flip"), r"pairing='flip' .*'perm', 'roll'"),
    (lambda: Cutout(size=0), r"size=0 .*integer >= 1"),
    (lambda: Cutout(prob=-0.5), r"prob=-0\.5 .*\[0, 1\]"),
    (lambda: CutMix(minmax=(0.8, 0.2)), r"minmax=\(0\.8, 0\.2\) .*0 < min < max <= 1"),
    (lambda: CutMix(minmax=(0.0, 0.5)), r"minmax=\(0\.0, 0\.5\) .*0 < min < max <= 1"),
    (lambda: CutMix(minmax=(0.2, 1.2)), r"minmax=\(0\.2, 1\.2\) .*0 < min < max <= 1"),
    (lambda: CutMixUp(CutMix(num_classes=10), MixUp(num_classes=100)), r"num_classes.*must agree"),
    (lambda: CutMixUp(MixUp()), r"cutmix=MixUp\(.*must be a CutMix"),
    (lambda: CutMixUp(mixup=CutMix()), r"mixup=CutMix\(.*must be a MixUp"),
])
def test_bad_arguments_raise_naming_argument_and_range(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


@pytest.mark.parametrize("images, labels, pattern", [
    (torch.rand(4, 32, 32), torch.zeros(4, dtype=torch.long), r"4-D floating tensor.*\(4, 32, 32\)"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), r"4-D floating.*uint8"),
    ([[0.0]], torch.zeros(1, dtype=torch.long), r"4-D floating tensor.*list"),
    (torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long), r"at least one sample"),
    (torch.rand(4, 3, 8, 8), torch.zeros(4, 1, dtype=torch.long), r"labels must be integer \[B\] = \[4\]"),
    (torch.rand(4, 3, 8, 8), torch.zeros(5, dtype=torch.long), r"labels must be integer \[B\] = \[4\]"),
    (torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 10, 2]), r"labels must lie in \[0, 9\].*\[0, 10\]"),
    (torch.rand(4, 3, 8, 8), torch.tensor([0, -1, 3, 2]), r"labels must lie in \[0, 9\].*\[-1, 3\]"),
    (torch.rand(4, 3, 8, 8), torch.rand(4, 9), r"soft labels must have shape \[B, K\] = \[4, 10\]"),
    (torch.rand(4, 3, 8, 8), [0, 1, 2, 3], r"labels must be a tensor"),
])
@pytest.mark.parametrize("mixer", [CutMix(num_classes=K), MixUp(num_classes=K), CutMixUp(CutMix(num_classes=K)),
                                   Cutout(num_classes=K)], ids=["cutmix", "mixup", "cutmixup", "cutout"])
def test_bad_inputs_raise_clear_errors(mixer, images, labels, pattern):
    with pytest.raises(ValueError, match=pattern):
        mixer(images, labels)


# -- num_classes: the data's unless given ------------------------------------------------------------------
@pytest.mark.parametrize("mixer", [CutMix(), MixUp(), CutMixUp(), Cutout()],
                         ids=["cutmix", "mixup", "cutmixup", "cutout"])
def test_a_mixer_without_num_classes_used_on_its_own_raises(mixer):
    images, labels = _batch(4)
    unset = r"num_classes is not set: pass num_classes=K, or let the DataModule set it from the data$"
    for call in (mixer, mixer.mix):
        with pytest.raises(ValueError, match=unset) as err:
            call(images, labels)
        assert "\n" not in str(err.value)
    bound = mixer.bind_classes(K)  # what the DataModule does: a copy, the mixer itself stays unset
    assert bound.num_classes == K and mixer.num_classes is None
    assert bound(images, labels)[1].shape == (4, K)


def test_bind_classes_fills_a_null_num_classes_and_refuses_another():
    given = CutMix(num_classes=10)
    assert given.bind_classes(10) is given
    with pytest.raises(ValueError, match=r"^data.mixer.num_classes=10 does not match the 100 classes of the data; fix: "
                                         r"data.mixer.init_args.num_classes 100, or leave it null \(the data's\)$"):
        given.bind_classes(100)
    with pytest.raises(ValueError, match=r"^num_classes=1 .*>= 2"):
        CutMix().bind_classes(1)
    both = CutMixUp().bind_classes(100)  # the halves too
    assert (both.num_classes, both.cutmix.num_classes, both.mixup.num_classes) == (100, 100, 100)
    # CutMixUp's halves agree where both are set; a null half takes the other's
    half = CutMixUp(CutMix(num_classes=7), MixUp())
    assert (half.num_classes, half.cutmix.num_classes, half.mixup.num_classes) == (7, 7, 7)
    assert CutMixUp(mixup=MixUp(num_classes=7)).cutmix.num_classes == 7
    with pytest.raises(ValueError, match=r"fix: data.mixer.init_args.cutmix.init_args.num_classes 10 and "
                                         r"data.mixer.init_args.mixup.init_args.num_classes 10, or leave them null"):
        half.bind_classes(10)


# -- label smoothing: only in the loss --------------------------------------------------------------------
@pytest.mark.parametrize("cls", [CutMix, MixUp, CutMixUp, Cutout])
def test_smoothing_is_applied_once_in_the_loss_never_in_the_data(cls, tiny_cifar):
    with pytest.raises(TypeError):
        cls(label_smoothing=0.1)
    with pytest.raises(TypeError):
        CIFAR10DataModule(str(tiny_cifar), label_smoothing=0.1)
    eps = 0.1
    dm = CIFAR10DataModule(str(tiny_cifar), download=False, mixer=cls(prob=1.0))
    images, labels = _uint8_batch(16)
    batch = dm.transform(images, labels, 0, torch.Generator().manual_seed(0))
    # the data's targets carry no smoothing floor: at most two classes hold any mass
    assert ((batch.targets > 0).sum(-1) <= 2).all() and torch.allclose(batch.targets.sum(-1), torch.ones(16))
    model = ImageClassifier(net=ResNet(8, width=4), label_smoothing=eps)
    logits = model(batch.images)
    once = -(((1 - eps) * batch.targets + eps / 10) * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(model.criterion(logits, batch.targets), once)


def test_smoothing_in_the_loss_equals_timms_smoothed_mixed_targets():
    """Loss smoothing of our mixed targets == timm's mixup_target(..., smoothing) with no smoothing in the loss."""
    timm_mixup = pytest.importorskip("timm.data.mixup")
    eps, k = 0.1, 10
    images, labels = _batch(2)
    labels = torch.tensor([3, 7])
    mixer = CutMix(mode="batch", pairing="roll", num_classes=K)
    out = mixer.mix(images, labels, torch.Generator().manual_seed(4))
    lam = out.lam[0].item()
    assert 0 < lam < 1
    timm_targets = timm_mixup.mixup_target(labels, k, lam=lam, smoothing=eps)  # pairs i with flip(0): roll for 2
    logits = torch.randn(2, k, generator=torch.Generator().manual_seed(1))
    ours = SoftTargetCrossEntropy(eps)(logits, out.targets)
    theirs = SoftTargetCrossEntropy(0.0)(logits, timm_targets)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(out.targets * (1 - eps) + eps / k, timm_targets)


# -- YAML configuration -----------------------------------------------------------------------------------
YAML = """
data:
  data_dir: {data_dir}
  download: false
  mix_off_epoch: 190
  mixer:
    class_path: cutmix_pl.augment.CutMixUp
    init_args:
      cutmix:
        class_path: cutmix_pl.augment.CutMix
        init_args: {{alpha: 1.0, minmax: [0.2, 0.8], correct_lam: true}}
      mixup:
        class_path: cutmix_pl.augment.MixUp
        init_args: {{alpha: 0.8}}
      switch_prob: 0.5
      prob: 1.0
      mode: batch
      pairing: roll
"""


def test_every_option_is_configurable_from_yaml(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CIFAR10DataModule, "data")
    cfg = parser.parse_string(YAML.format(data_dir=tmp_path))
    dm = parser.instantiate_classes(cfg).data
    assert dm.transform.mix_off_epoch == 190
    mixer = dm.mixer
    assert isinstance(mixer, CutMixUp) and (mixer.switch_prob, mixer.mode, mixer.pairing) == (0.5, "batch", "roll")
    assert mixer.cutmix.minmax == (0.2, 0.8) and mixer.cutmix.correct_lam and mixer.mixup.alpha == 0.8
    # the HPARAMS tab's record: each alpha once, with its own half
    record = dm.hparams["mixer"]
    assert record.startswith("CutMixUp(prob=") and record.count("alpha=") == 2 and "alpha=0.8" in record
    bad = YAML.format(data_dir=tmp_path).replace("switch_prob: 0.5", "switch_prob: 1.5")
    with pytest.raises(ValueError, match=r"switch_prob=1\.5 .*\[0, 1\]"):
        parser.instantiate_classes(parser.parse_string(bad))


# -- the off switch, through the DataModule ---------------------------------------------------------------
def _uint8_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def test_mix_off_epoch_turns_mixing_off_from_that_epoch(tmp_path):
    dm = CIFAR10DataModule(str(tmp_path), download=False, mixer=CutMix(prob=1.0), mix_off_epoch=3)
    assert [dm.transform.mixing_on(e) for e in range(5)] == [True, True, True, False, False]
    images, labels = _uint8_batch()
    for epoch in range(5):
        batch = dm.transform(images, labels, epoch, torch.Generator().manual_seed(epoch))
        if epoch < 3:
            assert batch.targets.shape == (16, 10) and batch.targets.is_floating_point()
            assert (batch.lam < 1).any()
        else:  # plain crop/flip/normalise: integer targets, every lambda 1, nothing pasted
            assert torch.equal(batch.targets, labels) and torch.equal(batch.partner, labels)
            assert (batch.lam == 1).all()
            assert batch.images.dtype == torch.float32


@pytest.mark.parametrize("mix_off_epoch, expected",
                         [(None, [True] * 4), (0, [False] * 4), (2, [True, True, False, False])])
def test_mixing_on_schedule(tmp_path, mix_off_epoch, expected):
    dm = CIFAR10DataModule(str(tmp_path), download=False, mixer=MixUp(), mix_off_epoch=mix_off_epoch)
    assert [dm.transform.mixing_on(e) for e in range(4)] == expected
    assert not CIFAR10DataModule(str(tmp_path), download=False, mixer=None).transform.mixing_on(0)


def test_negative_mix_off_epoch_counts_from_the_end_of_training():
    transform = TrainTransform(CutMix(num_classes=K), mix_off_epoch=-2)
    with pytest.raises(ValueError, match=r"data.mix_off_epoch=-2 counts from the end .* fix: set trainer.max_epochs"):
        transform.mixing_on(0)  # no end to count from
    for max_epochs, first_off in ((15, 13), (30, 28), (2, 0)):
        transform.max_epochs = max_epochs
        assert [transform.mixing_on(e) for e in range(max_epochs)] == [e < first_off for e in range(max_epochs)]
    transform.max_epochs, transform.mix_off_epoch = 1, -3  # would never mix: a mistake, not a schedule
    with pytest.raises(ValueError, match=r"mix_off_epoch=-3 counts back past the start .*fix: -1, a value >= 0, or null"):
        transform.mixing_on(0)
    transform.max_epochs, transform.mix_off_epoch = -1, -2  # Lightning's "no limit" (max_steps only)
    with pytest.raises(ValueError, match="trainer.max_epochs is -1"):
        transform.mixing_on(0)


def test_datamodule_takes_the_end_of_training_from_its_trainer(tiny_cifar):
    dm = CIFAR10DataModule(str(tiny_cifar), download=False, val_size=100, mixer=CutMix(), mix_off_epoch=-2)
    dm.trainer = L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_progress_bar=False)
    dm.setup("fit")
    assert dm.transform.mix_off() == 13
    dm.trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"mix_off_epoch=-2 counts back past the start"):
        dm.setup("fit")  # fails before any training


# -- randomness: per-rank streams, seed_everything --------------------------------------------------------
def _rank_dm(data_dir, rank, monkeypatch, seed=5):
    dm = CIFAR10DataModule(str(data_dir), download=False, batch_size=64, val_size=100, mixer=CutMix(), seed=seed)
    as_rank(dm, rank, 2).train_dataloader()
    return dm


def test_ranks_get_different_augmentation_streams(tiny_cifar, monkeypatch):
    images, labels = _uint8_batch(32)
    r0, r1, r0_again = (_rank_dm(tiny_cifar, r, monkeypatch) for r in (0, 1, 0))
    a, b, c = (dm.transform(images, labels, 0) for dm in (r0, r1, r0_again))
    assert torch.equal(a.images, c.images) and torch.equal(a.lam, c.lam), "same seed and rank: same stream"
    assert not torch.equal(a.images, b.images) and not torch.equal(a.lam, b.lam), "other rank: other stream"
    assert len({mix_seed(5, 1 + rank) for rank in range(64)}) == 64


def _mix_all(mixer, images, labels):
    return [mixer.mix(images, labels) for _ in range(3)]  # generator=None: torch's global RNG


@pytest.mark.parametrize("mixer", [CutMix(num_classes=K), CutMix(mode="batch", num_classes=K), MixUp(num_classes=K),
                                   CutMixUp(CutMix(num_classes=K)), Cutout(prob=0.5, num_classes=K)],
                         ids=["cutmix", "cutmix-batch", "mixup", "cutmixup", "cutout"])
def test_seed_everything_makes_the_global_stream_reproducible(mixer):
    images, labels = _batch(32)
    L.seed_everything(11, verbose=False)
    first = _mix_all(mixer, images, labels)
    L.seed_everything(11, verbose=False)
    again = _mix_all(mixer, images, labels)
    L.seed_everything(12, verbose=False)
    other = _mix_all(mixer, images, labels)
    for a, b in zip(first, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not all(torch.equal(a.images, o.images) for a, o in zip(first, other))


def test_datamodule_stream_follows_seed_everything_when_seed_is_null(tiny_cifar, monkeypatch):
    def state(seed):
        L.seed_everything(seed, verbose=False)
        return _rank_dm(tiny_cifar, 0, monkeypatch, seed=None).transform.generator.get_state()

    assert torch.equal(state(21), state(21))
    assert not torch.equal(state(21), state(22))


def test_a_mix_off_epoch_at_or_past_the_end_warns_that_every_epoch_mixes(tiny_cifar, recwarn):
    for off, warned in ((15, True), (20, True), (14, False), (-2, False)):
        dm = CIFAR10DataModule(str(tiny_cifar), download=False, val_size=100, mixer=CutMix(), mix_off_epoch=off)
        dm.trainer = L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_progress_bar=False)
        recwarn.clear()
        dm.setup("fit")
        said = [str(w.message) for w in recwarn if "so every epoch mixes" in str(w.message)]
        assert said == ([f"data.mix_off_epoch={off} is not before trainer.max_epochs=15, so every epoch mixes; fix: "
                         "a mix_off_epoch below 15 (or negative, from the end), or null to say that every epoch "
                         "mixes"] if warned else [])

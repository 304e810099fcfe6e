"""TrainTransform: the training collate step as one object, alone and inside the DataModule."""

import pytest
import torch

from cutmix_pl import cifar
from cutmix_pl.augment import CutMix, crop_flip_draw, normalize, random_crop_flip
from cutmix_pl.data import CIFAR10DataModule
from cutmix_pl.transform import TrainTransform

K = 10  # classes of the labels here: a mixer used on its own is told them


def _batch(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def test_one_call_is_crop_flip_then_normalise_then_mix():
    images, labels = _batch()
    transform = TrainTransform(CutMix(prob=1.0, num_classes=K))
    transform.seed(3)
    got = transform(images, labels, epoch=0)
    gen = torch.Generator().manual_seed(3)  # the same steps by hand, from the same stream
    x = normalize(random_crop_flip(images, 4, True, gen), cifar.MEAN, cifar.STD)
    mixed = CutMix(prob=1.0, num_classes=K).mix(x, labels, gen)
    assert torch.equal(got.images, mixed.images) and torch.equal(got.targets, mixed.targets)
    assert torch.equal(got.partner, torch.where(mixed.lam < 1, labels[mixed.index], labels))
    assert torch.equal(got.lam, mixed.lam)


def test_its_stream_resumes_from_its_state():
    images, labels = _batch()
    a, b = TrainTransform(CutMix(prob=0.5, num_classes=K)), TrainTransform(CutMix(prob=0.5, num_classes=K))
    a.seed(7)
    a(images, labels)
    b.seed(99)
    b.load_state_dict(a.state_dict())
    first, second = a(images, labels), b(images, labels)
    assert torch.equal(first.images, second.images) and torch.equal(first.targets, second.targets)
    assert not torch.equal(a(images, labels).images, first.images), "the stream moves on"


def test_without_a_mixer_or_after_mix_off_the_targets_are_the_labels():
    images, labels = _batch()
    mix_off = TrainTransform(CutMix(prob=1.0, num_classes=K), mix_off_epoch=2)
    for transform, epoch in ((TrainTransform(None), 0), (mix_off, 2)):
        out = transform(images, labels, epoch)
        assert torch.equal(out.targets, labels) and (out.lam == 1).all() and out.images.dtype == torch.float32
    with pytest.raises(ValueError, match=r"data.crop_padding=-1 is out of range: .*; fix: pass --data.crop_padding 4"):
        TrainTransform(crop_padding=-1)
    with pytest.raises(ValueError, match=r"mixer='cutmix' must be a CutMix, MixUp, CutMixUp or Cutout .*; fix: "):
        TrainTransform("cutmix")


def test_the_datamodule_hands_each_training_batch_to_its_transform_once(tiny_cifar):
    import lightning as L

    dm = CIFAR10DataModule(str(tiny_cifar), download=False, val_size=100, batch_size=64, seed=1)
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_epochs=3)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    reference = TrainTransform(dm.mixer)
    reference.seed(0)  # a stream to overwrite with the DataModule's
    reference.load_state_dict(dm.transform.state_dict())
    dm.trainer.training = True
    got = dm.on_after_batch_transfer((images, labels), 0)
    want = reference(images, labels, 0)
    assert torch.equal(got.images, want.images) and torch.equal(got.targets, want.targets)
    assert dm.state_dict()["batches_done"] == 1
    dm.trainer.training = False  # evaluation: normalised only, labels untouched
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(x, normalize(images, cifar.MEAN, cifar.STD)) and torch.equal(y, labels)


def test_randaugment_runs_after_crop_flip_and_before_mixing_from_the_same_stream():
    from cutmix_pl.randaugment import RandAugment

    images, labels = _batch()
    ra = RandAugment(num_ops=2, magnitude=9)
    transform = TrainTransform(CutMix(prob=1.0, num_classes=K), randaugment=ra)
    transform.seed(4)
    got = transform(images, labels)
    gen = torch.Generator().manual_seed(4)
    x = ra(random_crop_flip(images, 4, True, gen), gen)
    mixed = CutMix(prob=1.0, num_classes=K).mix(normalize(x, cifar.MEAN, cifar.STD), labels, gen)
    assert torch.equal(got.images, mixed.images) and torch.equal(got.targets, mixed.targets)
    plain = TrainTransform(CutMix(prob=1.0, num_classes=K))
    plain.seed(4)
    assert not torch.equal(plain(images, labels).images, got.images)
    with pytest.raises(ValueError, match="randaugment='ra' must be a cutmix_pl.randaugment.RandAugment"):
        TrainTransform(randaugment="ra")


def test_compiled_transform_draws_the_same_batch_and_cutmix_stays_a_pixel_copy():
    """compile=True fuses the arithmetic; the draws, boxes, labels and lambdas are the eager ones exactly. Only the
    normalisation may round differently (a fused multiply-add), by at most one float32 ulp."""
    images, labels = _batch(64)
    eager = TrainTransform(CutMix(prob=0.5, num_classes=K), mix_off_epoch=1)
    fused = TrainTransform(CutMix(prob=0.5, num_classes=K), mix_off_epoch=1, compile=True)
    for t in (eager, fused):
        t.seed(5)
    want, got = eager(images, labels, epoch=0), fused(images, labels, epoch=0)
    assert fused._compiled is not None and eager._compiled is None  # the compiled function made the batch
    for name in ("targets", "labels", "partner", "lam"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.images, want.images, rtol=0, atol=3e-7)
    # Seeded again, the unmixed epoch draws the same crops and nothing else: the compiled normalised batch that was
    # mixed. Each mixed pixel must be exactly the image's own pixel or its partner's from that batch.
    for t in (eager, fused):
        t.seed(5)
    plain = fused(images, labels, epoch=1).images
    gen = torch.Generator().manual_seed(5)
    crop_flip_draw(len(images), 4, True, images.device, gen)
    mixer = fused.mixer
    draws = mixer.draw(plain, gen)
    keep = mixer.weights(plain, draws)[0].bool().expand_as(plain)
    assert torch.equal(got.images, torch.where(keep, plain, plain[draws["index"]]))
    assert 0 < keep.logical_not().float().mean() < 0.5  # some pixels pasted, most kept (prob 0.5)


def test_a_single_image_instead_of_a_batch_fails_in_one_line():
    transform = TrainTransform(CutMix(prob=0.5, num_classes=K))
    with pytest.raises(ValueError, match=r"images must be \[B, C, H, W\]; got shape \[3, 32, 32\]"):
        transform(torch.zeros(3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))


def test_a_stream_saved_on_another_kind_of_device_is_replaced_by_a_reproducible_one(tiny_cifar):
    """A resume may move a run between CPU and GPU: a CUDA generator's state (16 bytes: seed and offset) cannot
    continue in the CPU generator, so the rank starts a new stream, seeded from the position, as after a change in
    the number of processes; a state of the CPU's kind is continued as it is."""
    import lightning as L

    from cutmix_pl.loaders import mix_seed

    def restored(state):
        dm = CIFAR10DataModule(str(tiny_cifar), download=False, val_size=100, batch_size=64, seed=1)
        dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_epochs=3)
        dm.setup("fit")
        dm.train_dataloader()
        dm.load_state_dict(state)
        return dm.transform.generator.get_state()

    cuda_state = torch.arange(16, dtype=torch.uint8)
    got = restored({"epoch": 1, "batches_done": 2, "aug_rng": cuda_state})
    want = torch.Generator().manual_seed(mix_seed(1, 1, 1, 1, 2)).get_state()
    assert torch.equal(got, want)
    cpu_state = torch.Generator().manual_seed(123).get_state()
    assert torch.equal(restored({"epoch": 1, "batches_done": 2, "aug_rng": cpu_state}), cpu_state)


def test_an_unmixed_sample_names_its_own_label_as_partner():
    images, labels = _batch(n=256)
    transform = TrainTransform(CutMix(prob=0.5, num_classes=K))
    transform.seed(5)
    got = transform(images, labels)
    unmixed = got.lam == 1
    assert 0 < int(unmixed.sum()) < len(labels)  # prob 0.5: both kinds in the batch
    assert torch.equal(got.partner[unmixed], labels[unmixed])
    assert (got.partner[~unmixed] != labels[~unmixed]).any()  # mixed ones name another image's label

"""The CutMix contract, checked sample by sample, and the batched crop/flip/normalise ops."""

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script
from cutmix_pl.augment import CutMix, CutMixUp, Cutout, MixUp, normalize, random_crop_flip

K = 10  # classes of the batches here: a mixer used on its own is told them


def _batch(n=16, k=10, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g).to(device)  # continuous values: no accidental equalities
    labels = torch.randint(0, k, (n,), generator=g).to(device)
    return images, labels


def _check_cutmix_contract(images, labels, out, k=10):
    """Every sample: one rectangle from its partner, the rest its own, targets weighted by pixel counts."""
    n, _, h, w = images.shape
    assert out.images.shape == images.shape and out.images.dtype == images.dtype
    assert out.targets.shape == (n, k) and out.targets.dtype == torch.float32
    torch.testing.assert_close(out.targets.sum(1), torch.ones(n, device=images.device))
    onehot = F.one_hot(labels, k).float()
    for i in range(n):
        j = int(out.index[i])
        own = (out.images[i] == images[i]).all(0)
        from_partner = (out.images[i] == images[j]).all(0)
        assert (own | from_partner).all(), "every pixel comes from the sample or its partner"
        if j == i:  # paired with itself: nothing changes and the label is its own
            assert own.all()
            torch.testing.assert_close(out.targets[i], onehot[i])
            continue
        pasted = ~own
        if pasted.any():  # the pasted region is one axis-aligned rectangle
            ys, xs = pasted.nonzero(as_tuple=True)
            box = torch.zeros_like(pasted)
            box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            assert torch.equal(box, pasted)
        own_fraction = own.float().mean()
        assert out.lam[i].item() == pytest.approx(own_fraction.item(), abs=1e-6)
        expected = own_fraction * onehot[i] + (1 - own_fraction) * onehot[j]
        torch.testing.assert_close(out.targets[i], expected)


@pytest.mark.parametrize("n", [1, 2, 3, 16, 33])
@pytest.mark.parametrize("mode", ["elem", "batch"])
def test_cutmix_contract_for_every_sample(n, mode):
    torch.manual_seed(n)
    images, labels = _batch(n)
    before = images.clone()
    out = CutMix(alpha=1.0, mode=mode, num_classes=K).mix(images, labels)
    assert torch.equal(images, before), "input must not be modified in place"
    _check_cutmix_contract(images, labels, out)


def test_cutmix_elem_gives_each_sample_its_own_box():
    torch.manual_seed(0)
    images, labels = _batch(64)
    out = CutMix(mode="elem", num_classes=K).mix(images, labels)
    assert len(torch.unique(out.lam)) > 20
    out = CutMix(mode="batch", num_classes=K).mix(images, labels)
    moved = out.index != torch.arange(64)
    assert len(torch.unique(out.lam[moved])) == 1


def test_prob_zero_and_batch_of_one_leave_images_unchanged():
    images, labels = _batch(8)
    mixed, targets = CutMix(prob=0.0, num_classes=K)(images, labels)
    assert torch.equal(mixed, images)
    torch.testing.assert_close(targets, F.one_hot(labels, 10).float())
    mixed, targets = CutMix(num_classes=K)(images[:1], labels[:1])
    assert torch.equal(mixed, images[:1])
    torch.testing.assert_close(targets, F.one_hot(labels[:1], 10).float())


def test_prob_mixes_about_that_fraction():
    torch.manual_seed(1)
    images, labels = _batch(4000)
    out = CutMix(prob=0.3, pairing="roll", num_classes=K).mix(images, labels)
    mixed = (out.lam < 1).float().mean().item()
    assert 0.27 < mixed < 0.33


def test_soft_labels_are_mixed_too():
    images, labels = _batch(8)
    soft = torch.softmax(torch.randn(8, 10), -1)
    out = CutMix(num_classes=K).mix(images, soft)
    expected = out.lam[:, None] * soft + (1 - out.lam[:, None]) * soft[out.index]
    torch.testing.assert_close(out.targets, expected)


def test_generator_makes_it_reproducible():
    images, labels = _batch(32)
    a = CutMix(num_classes=K).mix(images, labels, torch.Generator().manual_seed(5))
    b = CutMix(num_classes=K).mix(images, labels, torch.Generator().manual_seed(5))
    c = CutMix(num_classes=K).mix(images, labels, torch.Generator().manual_seed(6))
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)


def test_cutmixup_mixes_each_sample_one_way_or_the_other():
    torch.manual_seed(2)
    images, labels = _batch(64)
    out = CutMixUp(CutMix(num_classes=K), MixUp(alpha=1.0, num_classes=K), switch_prob=0.5).mix(images, labels)
    assert 10 < int(out.is_cutmix.sum()) < 54
    for i in range(64):
        j = int(out.index[i])
        if j == i:
            continue
        if out.is_cutmix[i]:
            own = (out.images[i] == images[i]).all(0).float().mean()
            assert out.lam[i].item() == pytest.approx(own.item(), abs=1e-6)
        else:
            torch.testing.assert_close(out.images[i], out.lam[i] * images[i] + (1 - out.lam[i]) * images[j])


@pytest.mark.cuda
def test_cutmix_on_cuda_keeps_the_contract_and_the_device():
    images, labels = _batch(64, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = CutMix(num_classes=K).mix(images, labels, gen)
    assert out.images.device.type == "cuda" and out.targets.device.type == "cuda"
    _check_cutmix_contract(images, labels, out)


def test_crop_flip_shapes_and_content():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(images, padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8
    # every output is a shifted (possibly mirrored) window of its zero-padded input
    padded = F.pad(images, (4, 4, 4, 4))
    for i in range(64):
        found = any(torch.equal(out[i], cand)
                    for dy in range(9) for dx in range(9)
                    for cand in (padded[i, :, dy:dy + 32, dx:dx + 32], padded[i, :, dy:dy + 32, dx:dx + 32].flip(2)))
        assert found
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)


def test_crop_flip_keeps_pixel_statistics():
    torch.manual_seed(0)
    images = torch.randint(30, 256, (512, 3, 32, 32), dtype=torch.uint8)
    flipped = random_crop_flip(images, padding=0, flip=True)
    assert torch.equal(flipped.sort(-1).values, images.sort(-1).values)  # rows are permuted, not changed
    cropped = random_crop_flip(images, padding=4).float()
    # zero padding enters the crops: on average (1 - E|shift|/32)^2 of the pixels stay, with E|shift| = 20/9
    kept = (cropped > 0).float().mean().item()
    assert kept == pytest.approx((1 - 20 / 9 / 32) ** 2, abs=0.01)


def test_normalize_standardises_per_channel():
    images = torch.randint(0, 256, (256, 3, 8, 8), dtype=torch.uint8)
    mean = images.float().div(255).mean((0, 2, 3))
    std = images.float().div(255).std((0, 2, 3))
    out = normalize(images, mean, std)
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode", ["elem", "batch"])
@pytest.mark.parametrize("kwargs", [{"minmax": (0.2, 0.8)}, {"alpha": 0.3}, {"prob": 0.5, "pairing": "roll"}],
                         ids=["minmax", "alpha0.3", "prob0.5-roll"])
def test_cutmix_contract_holds_for_every_option(kwargs, mode):
    torch.manual_seed(3)
    images, labels = _batch(33)
    _check_cutmix_contract(images, labels, CutMix(mode=mode, num_classes=K, **kwargs).mix(images, labels))


def test_cutmix_keeps_low_precision_images_exact():
    images, labels = _batch(16)
    images = images.to(torch.bfloat16)
    out = CutMix(num_classes=K).mix(images, labels, torch.Generator().manual_seed(0))
    assert out.images.dtype == torch.bfloat16
    _check_cutmix_contract(images, labels, out)


def test_the_augment_benchmark_times_the_same_job_for_every_method(capsys):
    """scripts/bench_augment.py compares like with like: on one batch, every method it times returns the batch's
    images with pixels pasted from another image of the batch and soft targets weighted by the pasted area; and the
    script runs end to end at minimal sizes, printing its table (no timing is checked)."""
    pytest.importorskip("timm")
    bench = load_script("bench_augment")
    methods = bench.build_methods()
    assert list(methods) == ["ours CutMix elem", "ours CutMix batch", "timm Mixup elem", "timm Mixup batch",
                             "torchvision v2.CutMix"]
    torch.manual_seed(0)
    images, labels = _batch(8)
    for name, method in methods.items():
        mixed, targets = method(images.clone(), labels)  # timm mixes in place: a copy each
        assert mixed.shape == images.shape and targets.shape == (8, 10), name
        torch.testing.assert_close(targets.sum(1), torch.ones(8), msg=name)
        onehot = F.one_hot(labels, 10).float()
        for i in range(8):
            own = (mixed[i] == images[i]).all(0)
            partner = next((j for j in range(8) if j != i and torch.equal(mixed[i][:, ~own], images[j][:, ~own])), i)
            assert own.any() and (own | (mixed[i] == images[partner]).all(0)).all(), f"{name}: sample {i}"
            lam = own.float().mean()
            torch.testing.assert_close(targets[i], lam * onehot[i] + (1 - lam) * onehot[partner], msg=name)
    rows = bench.main(["--batch-sizes", "8", "--reps", "1", "--min-time", "0", "--devices", "cpu"])
    assert [r["method"] for r in rows] == list(methods)
    assert f"{rows[0]['img_per_s']:,.0f}" in capsys.readouterr().out  # the printed table shows the measured rates


@pytest.mark.cuda
@pytest.mark.parametrize("make", [lambda: CutMix(mode="batch", prob=0.5, num_classes=K),
                                  lambda: CutMix(minmax=(0.2, 0.8), num_classes=K),
                                  lambda: MixUp(alpha=1.0, num_classes=K),
                                  lambda: CutMixUp(mixup=MixUp(alpha=1.0, num_classes=K)),
                                  lambda: Cutout(prob=0.5, num_classes=K)],
                         ids=["cutmix-batch", "minmax", "mixup", "cutmixup", "cutout"])
def test_every_mixer_runs_on_cuda_with_a_cuda_generator(make):
    images, labels = _batch(33, device="cuda")
    a = make().mix(images, labels, torch.Generator(device="cuda").manual_seed(1))
    b = make().mix(images, labels, torch.Generator(device="cuda").manual_seed(1))
    assert a.images.device.type == a.targets.device.type == a.lam.device.type == "cuda"
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    torch.testing.assert_close(a.targets.sum(1), torch.ones(33, device="cuda"))

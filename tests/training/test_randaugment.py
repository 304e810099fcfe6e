"""RandAugment per image on the device, checked operation by operation against torchvision's functional ops."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from cutmix_pl.randaugment import OPS, RandAugment, magnitudes

GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}


def reference(image: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """torchvision's RandAugment step for one uint8 image [C, H, W], through the public functional API."""
    if op == "ShearX":
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[math.degrees(math.atan(magnitude)), 0.0], center=[0, 0])
    if op == "ShearY":
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[0.0, math.degrees(math.atan(magnitude))], center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        t = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        return TF.affine(image, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0])
    if op == "Rotate":
        return TF.rotate(image, angle=magnitude)
    blends = {"Brightness": TF.adjust_brightness, "Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast,
              "Sharpness": TF.adjust_sharpness}
    if op in blends:
        return blends[op](image, 1.0 + magnitude)
    if op == "Posterize":
        return TF.posterize(image, int(magnitude))
    if op == "Solarize":
        return TF.solarize(image, 255.0 * magnitude)
    if op == "AutoContrast":
        return TF.autocontrast(image)
    if op == "Equalize":
        return TF.equalize(image)
    return image


def images(n=12, seed=0):
    """Noise images of different contrast ranges (so autocontrast and equalize have work), two of them flat."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    lo = torch.rand(n, 1, 1, 1, generator=g) * 100
    span = torch.rand(n, 1, 1, 1, generator=g) * 155 + 1
    x = (lo + x * span).round().clamp(0, 255).to(torch.uint8)
    x[0], x[1, 1] = 77, 200
    return x


def mismatch(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (ours != theirs).float().mean().item()


@pytest.mark.parametrize("op", OPS)
def test_each_operation_matches_torchvision_per_image(op):
    x = images()
    n = len(x)
    ra = RandAugment(magnitude=9)
    table = magnitudes(op, 31, 32, 32)
    bins = torch.arange(n) * 30 // (n - 1)  # every image its own magnitude, 0 to 30
    sign = torch.where(torch.arange(n) % 2 == 1, -1.0, 1.0).double() if op in GEOMETRIC | {
        "Brightness", "Color", "Contrast", "Sharpness"} else torch.ones(n).double()
    mags = table[bins] * sign
    ops = torch.full((1, n), OPS.index(op))
    ours = ra.apply(x, ops, mags[None])
    theirs = torch.stack([reference(x[i], op, float(mags[i])) for i in range(n)])
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    # bit-identical: the same matrices, grid and rounding as torchvision (on a CPU; see the CUDA test's tolerance)
    assert torch.equal(ours, theirs), f"{op}: {mismatch(ours, theirs):.4%} of the pixels differ"


def test_a_batch_equals_each_image_augmented_alone_with_its_own_draw():
    x = images(64, seed=1)
    ra = RandAugment(num_ops=2, magnitude=9, random_magnitude=True)
    ops, mags = ra.draw(len(x), 32, 32, x.device, torch.Generator().manual_seed(3))
    ours = ra.apply(x, ops, mags)
    theirs = x.clone()
    for i in range(len(x)):
        for r in range(2):
            theirs[i] = reference(theirs[i], OPS[ops[r, i]], float(mags[r, i]))
    assert torch.equal(ours, theirs), f"{mismatch(ours, theirs):.4%} of the pixels differ"
    assert len(set(map(tuple, ops.T.tolist()))) > 30, "images draw their own operations"


def test_draws_signs_and_magnitude_ranges():
    ra = RandAugment(num_ops=3, magnitude=12, random_magnitude=True)
    ops, mags = ra.draw(20_000, 32, 32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert set(ops.unique().tolist()) == set(range(len(OPS)))
    for k, op in enumerate(OPS):
        m = mags[ops == k]
        table = magnitudes(op, 31, 32, 32)[:13]
        allowed = torch.cat([table, -table])
        assert torch.isin(m, allowed).all(), op  # bins 0..12 only, each with its sign
        signed = op in GEOMETRIC | {"Brightness", "Color", "Contrast", "Sharpness"}
        if signed:
            assert 0.4 < (m < 0).float().sum() / (m != 0).float().sum() < 0.6, op
        else:
            assert (m >= 0).all(), op
    fixed = RandAugment(num_ops=1, magnitude=9)
    ops, mags = fixed.draw(1000, 32, 32, torch.device("cpu"), torch.Generator().manual_seed(0))
    for k, op in enumerate(OPS):
        assert torch.isin(mags[ops == k].abs(), magnitudes(op, 31, 32, 32)[9]).all(), op


def test_a_seed_reproduces_the_augmentation_and_float_batches_work():
    x = images(32, seed=2)
    ra = RandAugment()
    a = ra(x, torch.Generator().manual_seed(5))
    b = ra(x, torch.Generator().manual_seed(5))
    c = ra(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    as_float = ra(x.float() / 255, torch.Generator().manual_seed(5))
    assert as_float.dtype == torch.float32 and torch.equal((as_float * 255).round().to(torch.uint8), a)
    assert torch.equal(RandAugment(num_ops=0)(x), x)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"num_ops": -1}, r"num_ops=-1 is out of range"),
    ({"magnitude": 31}, r"magnitude=31 is out of range: it must be an integer in \[0, 30\]"),
    ({"num_magnitude_bins": 1}, r"num_magnitude_bins=1 is out of range"),
])
def test_bad_settings_fail_in_one_line(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RandAugment(**kwargs)


@pytest.mark.cuda
def test_on_cuda_it_matches_the_cpu():
    x = images(64, seed=3)
    ra = RandAugment(num_ops=2, magnitude=9)
    ops, mags = ra.draw(len(x), 32, 32, torch.device("cpu"), torch.Generator().manual_seed(1))
    cpu = ra.apply(x, ops, mags)
    gpu = ra.apply(x.cuda(), ops.cuda(), mags.cuda()).cpu()
    # nearest sampling: a coordinate within float error of a pixel edge may round the other way on another device
    assert mismatch(cpu, gpu) <= 0.002


def test_the_whole_batch_path_of_a_gpu_equals_the_per_branch_path_of_a_cpu():
    """On a GPU each branch runs on the whole batch (no host read to pick images out) and must be the identity for
    the images that drew none of its operations; on a CPU it runs on those images only. Same result."""
    from cutmix_pl.randaugment import blend, geometric, lookup

    x = images(64, seed=4)
    ra = RandAugment(num_ops=3, magnitude=14)
    ops, mags = ra.draw(len(x), 32, 32, x.device, torch.Generator().manual_seed(2))
    whole = x
    for op, mag in zip(ops, mags):
        for branch in (geometric, blend, lookup):
            whole = branch(whole, op, mag)
    assert torch.equal(whole, ra.apply(x, ops, mags))


def test_drawing_and_the_geometric_branch_copy_nothing_from_the_host():
    """On a GPU the batch path must not make the host wait: no tensor built from host data, no value read back,
    after the first call (which caches the magnitude table on the device)."""
    from conftest import HostReads
    from cutmix_pl.randaugment import _BLEND, _LOOKUP, _is, geometric

    x = images(16)
    ra = RandAugment(num_ops=2, magnitude=9, random_magnitude=True)
    gen = torch.Generator().manual_seed(0)
    ra.draw(len(x), 32, 32, x.device, gen)
    with HostReads() as reads:
        ops, mags = ra.draw(len(x), 32, 32, x.device, gen)
        for op, mag in zip(ops, mags):
            geometric(x, op, mag)
            _is(op, _BLEND), _is(op, _LOOKUP)
    assert reads.found == []

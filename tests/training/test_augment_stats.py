"""CutMix and MixUp against the papers, statistically: two-sample Kolmogorov-Smirnov tests in the tests themselves.

Our samples come from the real mixing code (pixels and targets of ``.mix()``); the references are independent
NumPy re-implementations written from the sources, not from our code:

* CutMix: Algorithm A1 of Yun et al. 2019 (arXiv:1905.04899) as in the authors' code (clovaai/CutMix-PyTorch,
  ``train.py``: ``rand_bbox`` and the lambda adjustment "to exactly match pixel ratio");
* minmax boxes: timm's ``rand_bbox_minmax`` (timm/data/mixup.py);
* MixUp: lambda ~ Beta(alpha, alpha) (Zhang et al. 2018), drawn with ``numpy.random.Generator.beta``.

Every test uses fixed seeds, so it is deterministic; the threshold ``P_MIN`` = 1e-3 would flag a correct
implementation one time in a thousand if the seeds were random. The pasted-area fraction is discrete (box
sides are whole pixels), for which the KS test is conservative: ties make p larger, never smaller. The negative
controls show the same test rejecting plausible wrong implementations, so it can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cutmix_pl.augment import CutMix, CutMixUp, MixUp

stats = pytest.importorskip("scipy.stats")

N = 20_000  # samples per distribution
SIDE = 32  # CIFAR image side
P_MIN = 1e-3
K = 10  # classes of the labels here: a mixer used on its own is told them


# -- independent references (NumPy) ----------------------------------------------------------------------
def paper_rand_bbox(size: tuple[int, ...], lam: float, rng: np.random.RandomState) -> tuple[int, int, int, int]:
    """``rand_bbox`` of clovaai/CutMix-PyTorch, line for line (``np.int`` is now ``int``)."""
    W = size[2]
    H = size[3]
    cut_rat = np.sqrt(1.0 - lam)
    cut_w = int(W * cut_rat)
    cut_h = int(H * cut_rat)
    # uniform
    cx = rng.randint(W)
    cy = rng.randint(H)
    bbx1 = np.clip(cx - cut_w // 2, 0, W)
    bby1 = np.clip(cy - cut_h // 2, 0, H)
    bbx2 = np.clip(cx + cut_w // 2, 0, W)
    bby2 = np.clip(cy + cut_h // 2, 0, H)
    return bbx1, bby1, bbx2, bby2


def paper_pasted_fraction(alpha: float, n: int = N, seed: int = 12345, clip: bool = True,
                          corrected: bool = True) -> np.ndarray:
    """1 - lambda of the paper's training loop: lam ~ Beta(alpha, alpha), box, lambda adjusted to the pixel ratio.

    ``clip=False`` / ``corrected=False`` give the wrong variants used as negative controls: the area of the box
    before clipping, and the sampled lambda instead of the adjusted one.
    """
    rng = np.random.RandomState(seed)
    size = (n, 3, SIDE, SIDE)
    out = np.empty(n)
    for i in range(n):
        lam = rng.beta(alpha, alpha)
        bbx1, bby1, bbx2, bby2 = paper_rand_bbox(size, lam, rng)
        if not corrected:
            out[i] = 1 - lam
        elif not clip:
            cut = int(SIDE * np.sqrt(1.0 - lam)) // 2 * 2
            out[i] = cut * cut / (SIDE * SIDE)
        else:  # adjust lambda to exactly match pixel ratio
            lam = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / (size[-1] * size[-2]))
            out[i] = 1 - lam
    return out


def timm_rand_bbox_minmax(img_shape, minmax, rng: np.random.RandomState, count=None):
    """``rand_bbox_minmax`` of timm/data/mixup.py, line for line."""
    assert len(minmax) == 2
    img_h, img_w = img_shape[-2:]
    cut_h = rng.randint(int(img_h * minmax[0]), int(img_h * minmax[1]), size=count)
    cut_w = rng.randint(int(img_w * minmax[0]), int(img_w * minmax[1]), size=count)
    yl = rng.randint(0, img_h - cut_h + 1, size=count)
    xl = rng.randint(0, img_w - cut_w + 1, size=count)
    yu = yl + cut_h
    xu = xl + cut_w
    return yl, yu, xl, xu


def timm_minmax_pasted_fraction(minmax: tuple[float, float], n: int = N, seed: int = 23456) -> np.ndarray:
    yl, yu, xl, xu = timm_rand_bbox_minmax((SIDE, SIDE), minmax, np.random.RandomState(seed), count=n)
    return (yu - yl) * (xu - xl) / (SIDE * SIDE)  # timm: lam = 1 - bbox_area / (H * W) whenever minmax is set


# -- what our code does, read off its output --------------------------------------------------------------
def observed(mixer, n: int = N, chunk: int = 2500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of pixels taken from the partner, partner's weight in the target) for n mixed samples.

    Sample i is the constant image i and pairing is ``roll``, so a pixel came from the partner exactly when it
    changed; labels i % 10 make a sample's and its partner's label differ, so the target splits cleanly.
    """
    gen = torch.Generator().manual_seed(seed)
    pasted, partner_weight = [], []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        images = torch.arange(m, dtype=torch.float32).view(m, 1, 1, 1).expand(m, 1, SIDE, SIDE).contiguous()
        labels = torch.arange(m) % 10
        out = mixer.mix(images, labels, gen)
        assert torch.equal(out.index, torch.arange(m).roll(1))
        pasted.append((out.images != images).double().mean((1, 2, 3)))
        partner_weight.append(1.0 - out.targets[torch.arange(m), labels].double())
    return torch.cat(pasted).numpy(), torch.cat(partner_weight).numpy()


def ks_p(a: np.ndarray, b: np.ndarray) -> float:
    return float(stats.ks_2samp(a, b).pvalue)


# -- CutMix against the paper -----------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_cutmix_area_matches_the_paper(alpha):
    """Pasted-pixel fraction and label weight, 20,000 samples, vs the paper's procedure; alpha 1 is the paper's."""
    reference = paper_pasted_fraction(alpha)
    pasted, weight = observed(CutMix(alpha=alpha, pairing="roll", num_classes=K))
    np.testing.assert_allclose(weight, pasted, atol=1e-6)  # the label is exactly the pixel ratio (correct_lam)
    assert ks_p(pasted, reference) > P_MIN
    assert ks_p(weight, reference) > P_MIN
    # the moments agree too (the standard error of a mean over 20,000 such samples is about 0.002)
    assert pasted.mean() == pytest.approx(reference.mean(), abs=0.01)


def test_cutmix_minmax_matches_timm():
    minmax = (0.2, 0.8)
    reference = timm_minmax_pasted_fraction(minmax)
    pasted, weight = observed(CutMix(minmax=minmax, pairing="roll", num_classes=K))
    np.testing.assert_allclose(weight, pasted, atol=1e-6)
    assert ks_p(pasted, reference) > P_MIN and ks_p(weight, reference) > P_MIN
    # box sides lie in [int(0.2 * 32), int(0.8 * 32)) = [6, 24] pixels, in ours as in the reference
    for fractions in (pasted, reference):
        assert fractions.min() >= (6 / 32) ** 2 - 1e-9 and fractions.max() <= (24 / 32) ** 2 + 1e-9


def test_cutmixup_cutmix_half_matches_the_paper():
    reference = paper_pasted_fraction(1.0)
    pasted, weight = observed(CutMixUp(CutMix(alpha=1.0, num_classes=K), MixUp(alpha=1.0), switch_prob=1.0,
                                       pairing="roll"))
    assert ks_p(pasted, reference) > P_MIN and ks_p(weight, reference) > P_MIN


def test_batch_mode_draws_one_box_per_batch_with_the_papers_law():
    mixer = CutMix(alpha=1.0, mode="batch", pairing="roll", num_classes=K)
    gen = torch.Generator().manual_seed(3)
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, SIDE, SIDE).contiguous()
    labels = torch.arange(8)
    fractions = []
    for _ in range(2000):
        out = mixer.mix(images, labels, gen)
        assert len(torch.unique(out.lam)) == 1, "one lambda per batch"
        changed = (out.images != images).all(1)  # [B, H, W]
        assert (changed == changed[0]).all(), "the same box in every sample"
        fractions.append(1.0 - out.lam[0].item())
    assert ks_p(np.array(fractions), paper_pasted_fraction(1.0, n=2000)) > P_MIN


# -- negative controls: the same test catches wrong implementations --------------------------------------
def test_negative_control_uncorrected_lambda_is_caught():
    """correct_lam=False: the pixels are right but the label keeps the sampled lambda -> the label test fails."""
    reference = paper_pasted_fraction(1.0)
    pasted, weight = observed(CutMix(alpha=1.0, correct_lam=False, pairing="roll", num_classes=K))
    assert ks_p(pasted, reference) > P_MIN
    assert ks_p(weight, reference) < P_MIN


class _BoxInside(CutMix):
    """A common wrong CutMix: the centre is drawn so that the box always fits, so it is never clipped."""

    def _draw(self, n, height, width, device, generator):
        lam = torch.rand(n, device=device, generator=generator)
        return {"lam": lam, "u": torch.rand(2, n, device=device, generator=generator), "coin": None}

    def _bounds(self, draws, height, width, device):  # (start, end) float [2, m] for (y, x), lambda [m]
        lam = draws["lam"]
        cut = (height * torch.sqrt(1.0 - lam)).floor() // 2 * 2
        start = (draws["u"] * (height - cut + 1)).floor()
        return start, start + cut, lam


def test_negative_control_unclipped_boxes_are_caught():
    reference = paper_pasted_fraction(1.0)
    pasted, weight = observed(_BoxInside(alpha=1.0, pairing="roll", num_classes=K))
    assert ks_p(pasted, reference) < P_MIN and ks_p(weight, reference) < P_MIN


@pytest.mark.parametrize("wrong", ["unclipped_area_label", "uncorrected_lambda", "other_alpha"])
def test_negative_control_wrong_references_are_caught(wrong):
    """Our correct samples against references built the wrong way are rejected too."""
    pasted, _ = observed(CutMix(alpha=1.0, pairing="roll", num_classes=K))
    reference = {"unclipped_area_label": lambda: paper_pasted_fraction(1.0, clip=False),
                 "uncorrected_lambda": lambda: paper_pasted_fraction(1.0, corrected=False),
                 "other_alpha": lambda: paper_pasted_fraction(2.0)}[wrong]()
    assert ks_p(pasted, reference) < P_MIN


# -- MixUp: stated convex combinations, lambda ~ Beta(alpha, alpha) ---------------------------------------
@pytest.mark.parametrize("mode", ["elem", "batch"])
@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_mixup_pixels_and_targets_are_the_stated_convex_combinations(mode, n):
    gen = torch.Generator().manual_seed(n)
    images = torch.randn(n, 3, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    out = MixUp(alpha=0.4, mode=mode, num_classes=K).mix(images, labels, gen)
    lam = out.lam
    expected = lam.view(-1, 1, 1, 1) * images + (1 - lam.view(-1, 1, 1, 1)) * images[out.index]
    torch.testing.assert_close(out.images, expected, rtol=1e-6, atol=1e-6)
    onehot = F.one_hot(labels, 10).float()
    torch.testing.assert_close(out.targets, lam[:, None] * onehot + (1 - lam[:, None]) * onehot[out.index])
    assert ((lam >= 0) & (lam <= 1)).all() and not out.is_cutmix.any()
    if mode == "batch":
        assert len(torch.unique(lam)) == 1


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_mixup_lambda_is_beta(alpha):
    """20,000 lambdas (elem mode) vs numpy's Beta(alpha, alpha); alpha 0.2 exercises the small-shape sampler."""
    gen = torch.Generator().manual_seed(7)
    images = torch.zeros(N, 1, 1, 1)
    out = MixUp(alpha=alpha, num_classes=K).mix(images, torch.zeros(N, dtype=torch.long), gen)
    reference = np.random.default_rng(7).beta(alpha, alpha, size=N)
    assert ks_p(out.lam.double().numpy(), reference) > P_MIN
    wrong = np.random.default_rng(8).beta(alpha * 1.5, alpha * 1.5, size=N)
    assert ks_p(out.lam.double().numpy(), wrong) < P_MIN  # negative control: a 1.5x alpha is caught


def test_cutmixup_switch_prob_splits_as_asked():
    gen = torch.Generator().manual_seed(9)
    images = torch.arange(4000, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    labels = torch.arange(4000) % 10
    mixer = CutMixUp(CutMix(num_classes=K), MixUp(alpha=1.0), switch_prob=0.3, prob=0.8, pairing="roll")
    out = mixer.mix(images, labels, gen)
    mixed = out.lam < 1
    share_cut = out.is_cutmix.float().mean().item()
    assert share_cut == pytest.approx(0.8 * 0.3, abs=0.03)  # binomial sd ~ 0.007
    assert mixed.float().mean().item() == pytest.approx(0.8, abs=0.03)
    blend = ~out.is_cutmix
    lam = out.lam[blend].view(-1, 1, 1, 1)
    torch.testing.assert_close(out.images[blend], lam * images[blend] + (1 - lam) * images[out.index][blend])


# -- odd batches and batch 1 ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 7])
@pytest.mark.parametrize("mode", ["elem", "batch"])
@pytest.mark.parametrize("pairing", ["perm", "roll"])
@pytest.mark.parametrize("make", [lambda m, p: CutMix(mode=m, pairing=p, num_classes=K),
                                  lambda m, p: MixUp(mode=m, pairing=p, num_classes=K),
                                  lambda m, p: CutMixUp(CutMix(num_classes=K), mode=m, pairing=p),
                                  lambda m, p: CutMix(minmax=(0.25, 0.75), mode=m, pairing=p, num_classes=K)],
                         ids=["cutmix", "mixup", "cutmixup", "minmax"])
def test_odd_batches_and_batch_one(make, n, mode, pairing):
    gen = torch.Generator().manual_seed(n)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    out = make(mode, pairing).mix(images, labels, gen)
    assert out.images.shape == images.shape and out.targets.shape == (n, 10)
    assert sorted(out.index.tolist()) == list(range(n))
    torch.testing.assert_close(out.targets.sum(1), torch.ones(n))
    if n == 1:  # the only partner is itself: nothing changes
        assert torch.equal(out.images, images)
        torch.testing.assert_close(out.targets, F.one_hot(labels, 10).float())

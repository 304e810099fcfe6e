"""scripts/robustness.py on tiny data: the occluded pixels, the mixed pairs, the top-2 metric, the CSVs' rows."""

import csv
import importlib.util
import shutil
import sys
from contextlib import chdir, redirect_stderr
from io import StringIO
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cli_runs import small
from cutmix_pl import cifar
from cutmix_pl.augment import normalize
from cutmix_pl.cli import main as cli_main
from cutmix_pl.module import ImageClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import robustness  # noqa: E402

SIZES = [0, 4, 8, 12, 16, 20, 24, 28]


# -- the occluded pixels ---------------------------------------------------------------------------------------
def grid(rows):
    return torch.tensor([[c == "x" for c in row] for row in rows])


def test_the_masks_on_an_8x8_image_are_the_centred_square_and_the_frame_around_it():
    assert torch.equal(robustness.occlusion_mask("centre", 4, side=8), grid(
        ["........", "........", "..xxxx..", "..xxxx..", "..xxxx..", "..xxxx..", "........", "........"]))
    assert torch.equal(robustness.occlusion_mask("boundary", 4, side=8), grid(
        ["xxxxxxxx", "xxxxxxxx", "xx....xx", "xx....xx", "xx....xx", "xx....xx", "xxxxxxxx", "xxxxxxxx"]))
    assert torch.equal(robustness.occlusion_mask("boundary", 6, side=8), grid(
        ["xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxx..xxx", "xxx..xxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx"]))
    for kind in ("centre", "boundary"):
        assert not robustness.occlusion_mask(kind, 0, side=8).any()  # size 0: the clean image


@pytest.mark.parametrize("size", SIZES)
def test_the_masks_at_every_size_of_a_cifar_image(size):
    centre, boundary = (robustness.occlusion_mask(k, size) for k in ("centre", "boundary"))
    lo, hi = 16 - size // 2, 16 + size // 2
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[lo:hi, lo:hi] = True  # rows and columns 16 - s/2 .. 16 + s/2 - 1
    assert torch.equal(centre, expected) and centre.sum() == size * size
    kept = torch.zeros(32, 32, dtype=torch.bool)
    kept[size // 2:32 - size // 2, size // 2:32 - size // 2] = True  # the centred (32 - s) square is kept
    assert torch.equal(boundary, ~kept) and boundary.sum() == 32 * 32 - (32 - size) ** 2
    if size == 28:
        assert (~boundary).nonzero().tolist() == [[r, c] for r in range(14, 18) for c in range(14, 18)]


def test_occluded_pixels_are_zero_after_normalisation_in_every_channel_and_the_rest_unchanged():
    raw = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = normalize(raw, cifar.MEAN, cifar.STD)
    for kind in ("centre", "boundary"):
        mask = robustness.occlusion_mask(kind, 12)
        out = robustness.occlude(x, mask)
        assert torch.equal(out[:, :, mask], torch.zeros(3, 3, int(mask.sum())))
        assert torch.equal(out[:, :, ~mask], x[:, :, ~mask])
        # 0 after normalisation is the mean colour of the training images, not black
        mean = torch.tensor(cifar.MEAN).view(1, 3, 1)
        torch.testing.assert_close(out[:, :, mask] * torch.tensor(cifar.STD).view(1, 3, 1) + mean,
                                   mean.expand(3, 3, int(mask.sum())))
    assert torch.equal(robustness.occlude(x, robustness.occlusion_mask("centre", 0)), x)


# -- the mixed pairs -------------------------------------------------------------------------------------------
def test_pairs_are_of_different_classes_seeded_and_each_image_comes_first_once():
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 5, 7])
    first, second = robustness.pairs(labels, seed=0)
    assert len(first) > 0 and (labels[first] != labels[second]).all()
    assert first.tolist() == sorted(set(first.tolist()))  # each image at most once as the first, in order
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    kept = [i for i in range(12) if labels[i] != labels[perm[i]]]  # exactly the equal-label pairs are left out
    assert first.tolist() == kept and second.tolist() == perm[kept].tolist()
    again = robustness.pairs(labels, seed=0)
    assert torch.equal(again[0], first) and torch.equal(again[1], second)
    other = robustness.pairs(labels, seed=1)
    assert not (torch.equal(other[0], first) and torch.equal(other[1], second))
    assert len(robustness.pairs(torch.zeros(5, dtype=torch.long), seed=0)[0]) == 0  # one class: no pairs


def test_mixup_is_the_exact_average_and_cutmix_takes_exactly_half_of_the_pixels_from_each():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 32, 32, generator=gen), torch.randn(4, 3, 32, 32, generator=gen) + 10  # never equal
    assert torch.equal(robustness.mix(a, b, "mixup"), (a + b) / 2)
    cut = robustness.mix(a, b, "cutmix")
    from_b = cut == b
    assert torch.equal(from_b | (cut == a), torch.ones_like(from_b))  # every pixel is one image's, unchanged
    assert from_b.float().mean() == 0.5  # the box is exactly half the area
    assert torch.equal(cut[..., :16], a[..., :16]) and torch.equal(cut[..., 16:], b[..., 16:])


def test_the_mixed_pairs_of_test_images_mix_two_different_classes():
    raw = torch.randint(0, 256, (10, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    first, second = robustness.pairs(labels, seed=3)
    (mixed,) = robustness.mixed_batches(raw, first, second, "mixup", 100, torch.device("cpu"))
    x = normalize(raw, cifar.MEAN, cifar.STD)
    assert torch.equal(mixed, (x[first] + x[second]) / 2) and (labels[first] != labels[second]).all()
    halves = list(robustness.mixed_batches(raw, first, second, "cutmix", 3, torch.device("cpu")))  # in batches
    assert torch.equal(torch.cat(halves), torch.cat([x[first][..., :16], x[second][..., 16:]], -1))


# -- the metric ------------------------------------------------------------------------------------------------
def test_top2_counts_a_pair_when_its_two_classes_are_the_two_top_predictions_in_either_order():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0],   # top 2: {0, 1}
                           [4.0, 5.0, 0.0, 0.0],   # {1, 0}: the same set
                           [5.0, 0.0, 4.0, 0.0],   # {0, 2}: only one of the pair
                           [5.0, 3.0, 4.0, 0.0],   # the pair's second class third
                           [0.0, 0.0, 5.0, 4.0]])  # neither
    first, second = torch.tensor([0, 0, 0, 0, 0]), torch.tensor([1, 1, 1, 1, 1])
    assert robustness.top2_both(logits, first, second).tolist() == [True, True, False, False, False]
    assert robustness.top2_both(logits, second, first).tolist() == [True, True, False, False, False]


# -- runs: methods, refusals, the CSVs ---------------------------------------------------------------------------
def test_the_method_is_the_last_part_of_the_mixer_class_path_without_importing_it():
    assert robustness.method_of({"data": {"mixer": {"class_path": "cutmix_pl.augment.CutMix"}}}) == "CutMix"
    assert robustness.method_of({"data": {"mixer": {"class_path": "cutmix_pl.augment.MixUp"}}}) == "MixUp"
    assert robustness.method_of({"data": {"mixer": {"class_path": "cutmix_pl.augment.Cutout"}}}) == "Cutout"
    assert robustness.method_of({"data": {"mixer": None}}) == "none"
    assert robustness.method_of({}) == "none"


def edit_config(run: Path, change) -> Path:
    config = yaml.safe_load((run / "config.yaml").read_text())
    change(config)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


@pytest.fixture(scope="module")
def tiny_runs(tiny_cifar, tmp_path_factory):
    """A finished one-epoch CutMix run of two steps (seed 0) and copies of it as seed 1 and as no mixing."""
    base = tmp_path_factory.mktemp("robustness_runs")
    with chdir(base), redirect_stderr(StringIO()):
        cli = cli_main(["fit", *small(tiny_cifar, trainer__max_epochs=1, data__train_size=32)])
    seed0 = Path(cli.trainer.log_dir).absolute()
    seed1 = edit_config(Path(shutil.copytree(seed0, base / "cutmix" / "version_1")),
                        lambda c: c.update(seed_everything=1))
    none = edit_config(Path(shutil.copytree(seed0, base / "baseline" / "version_0")),
                       lambda c: c["data"].update(mixer=None))
    return seed0, seed1, none


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_csvs_hold_every_size_and_mix_for_each_run_and_the_plots_one_line_per_method(
        tiny_runs, tiny_cifar, tmp_path, capsys):
    seed0, seed1, none = tiny_runs
    out = tmp_path / "out"
    tables = robustness.main([str(seed0), str(seed1 / "checkpoints" / "last.ckpt"), str(none),
                              "--data-dir", str(tiny_cifar), "--out", str(out), "--batch-size", "100"])
    labels = cifar.load(tiny_cifar)[1].labels
    n_pairs = len(robustness.pairs(labels, 0)[0])
    runs = [("CutMix", "0", str(seed0)), ("CutMix", "1", str(seed1)), ("none", "0", str(none))]
    for kind in ("centre", "boundary"):
        rows = read_csv(out / f"occlusion_{kind}.csv")
        assert list(rows[0]) == ["method", "seed", "run", "checkpoint", "size", "acc", "images"]
        assert [(r["method"], r["seed"], r["run"], int(r["size"])) for r in rows] == [
            (*run, s) for run in runs for s in SIZES]
        assert all(r["checkpoint"] == "last.ckpt" and r["images"] == str(len(labels)) for r in rows)
        accs = [float(r["acc"]) for r in rows]
        assert all(0 <= a <= 1 and round(a * len(labels), 3).is_integer() for a in accs)
    rows = read_csv(out / "in_between.csv")
    assert list(rows[0]) == ["method", "seed", "run", "checkpoint", "mix", "top2_both", "pairs"]
    assert [(r["method"], r["seed"], r["run"], r["mix"]) for r in rows] == [
        (*run, m) for run in runs for m in ("mixup", "cutmix")]
    assert all(r["pairs"] == str(n_pairs) and 0 <= float(r["top2_both"]) <= 1 for r in rows)
    assert [len(t) for t in tables.values()] == [3 * 8, 3 * 8, 3 * 2]

    # size 0 is the clean test set, for either occlusion: the accuracy Lightning's own loading gives
    model = ImageClassifier.load_from_checkpoint(seed0 / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    with torch.no_grad():
        clean = (model(normalize(cifar.load(tiny_cifar)[1].images, cifar.MEAN, cifar.STD)).argmax(-1) == labels)
    for kind in ("centre", "boundary"):
        first = read_csv(out / f"occlusion_{kind}.csv")[0]
        assert float(first["acc"]) == pytest.approx(clean.double().mean().item(), abs=1e-6)
    # the copies hold the same weights, so the seeds' mean is either seed's value
    means = robustness.means(tables["occlusion_centre"], "size", "acc")
    assert list(means) == ["CutMix", "none"] and means["CutMix"][0] == 2 and means["none"][0] == 1
    assert list(means["CutMix"][1]) == SIZES
    printed = capsys.readouterr().out
    assert "| CutMix | 2 |" in printed and "| none | 1 |" in printed and "| method | runs | MixUp | CutMix |" in printed
    names = ("occlusion_centre", "occlusion_boundary", "in_between")
    plotted = importlib.util.find_spec("matplotlib") is not None  # the plots need it
    kinds = ("csv", "png") if plotted else ("csv",)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{e}" for n in names for e in kinds)
    for name in names if plotted else ():
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG" and im.size == (720, 480)


def test_a_name_sets_the_method_and_without_matplotlib_the_csvs_are_still_written(
        tiny_runs, tiny_cifar, tmp_path, capsys, monkeypatch):
    seed0 = tiny_runs[0]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    best = next((seed0 / "checkpoints").glob("best-*.ckpt"))
    robustness.main([f"CutMix alpha 1={best}", "--data-dir", str(tiny_cifar), "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "in_between.csv")
    assert {r["method"] for r in rows} == {"CutMix alpha 1"} and {r["checkpoint"] for r in rows} == {best.name}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_between.csv", "occlusion_boundary.csv",
                                                          "occlusion_centre.csv"]
    assert "matplotlib is not installed: the CSVs are written, the plots need it" in capsys.readouterr().err


def test_images_n_evaluates_the_first_n_test_images_and_says_what_it_is_doing(tiny_runs, tiny_cifar, tmp_path, capsys):
    seed0 = tiny_runs[0]
    robustness.main([str(seed0), "--data-dir", str(tiny_cifar), "--out", str(tmp_path), "--images", "50"])
    labels = cifar.load(tiny_cifar)[1].labels[:50]
    assert {r["images"] for r in read_csv(tmp_path / "occlusion_centre.csv")} == {"50"}
    assert {r["pairs"] for r in read_csv(tmp_path / "in_between.csv")} == {str(len(robustness.pairs(labels, 0)[0]))}
    err = capsys.readouterr().err
    ckpt = seed0 / "checkpoints" / "last.ckpt"
    assert f"robustness.py: run 1 of 1: CutMix, seed 0, {ckpt}: 50 images, 17 passes" in err
    assert "robustness.py: run 1 of 1: evaluated" in err


def refused(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        robustness.main(list(argv))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("robustness.py: error: ") and "; fix: " in err, err
    return err


def test_missing_unfinished_and_unsafe_runs_are_refused_in_one_line_before_anything_is_written(
        tiny_runs, tiny_cifar, tmp_path, capsys):
    seed0 = tiny_runs[0]
    out = tmp_path / "out"
    data = ["--data-dir", str(tiny_cifar), "--out", str(out)]
    assert "is neither a run folder nor a checkpoint file" in refused(capsys, str(tmp_path / "nothing"), *data)
    empty = tmp_path / "runs" / "empty" / "version_0"
    empty.mkdir(parents=True)
    assert "holds no checkpoints/last.ckpt" in refused(capsys, str(seed0), str(empty), *data)
    unfinished = edit_config(Path(shutil.copytree(seed0, tmp_path / "runs" / "long" / "version_0")),
                             lambda c: c["trainer"].update(max_epochs=5))
    line = refused(capsys, str(seed0), str(unfinished), *data)
    assert f"{unfinished} is unfinished: its last.ckpt holds 1 epochs (2 steps) of 5 epochs" in line
    loose = tmp_path / "loose.ckpt"
    shutil.copy(seed0 / "checkpoints" / "last.ckpt", loose)
    assert "holds no config.yaml" in refused(capsys, str(loose), *data)
    assert "is given twice" in refused(capsys, str(seed0), str(seed0 / "checkpoints" / "last.ckpt"), *data)
    mine = Path(shutil.copytree(seed0, tmp_path / "runs" / "mine" / "version_0"))
    checkpoint = torch.load(mine / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["net"]["class_path"] = "somewhere.Evil"
    torch.save(checkpoint, mine / "checkpoints" / "evil.ckpt")
    assert "of class 'somewhere.Evil', which this command does not import" in refused(
        capsys, str(mine / "checkpoints" / "evil.ckpt"), *data)
    for change in ({"dataset": "folder", "image_size": 64}, {"dataset": "cifar100"}):  # the tests are CIFAR-10's
        checkpoint = torch.load(mine / "checkpoints" / "last.ckpt", weights_only=True)
        checkpoint["datamodule_hyper_parameters"].update(change)
        checkpoint["hyper_parameters"]["num_classes"] = 3
        torch.save(checkpoint, mine / "checkpoints" / "other.ckpt")
        line = refused(capsys, str(seed0), str(mine / "checkpoints" / "other.ckpt"), *data)
        assert f"was trained on {change['dataset']} (3 classes, " in line and "fix: give runs trained with" in line
    (mine / "checkpoints" / "broken.ckpt").write_bytes(b"not a checkpoint")
    assert "is not a readable checkpoint" in refused(capsys, str(mine / "checkpoints" / "broken.ckpt"), *data)
    assert "no CIFAR-10 in" in refused(capsys, str(seed0), "--data-dir", str(tmp_path), "--out", str(out))
    assert "--batch-size 0 is out of range" in refused(capsys, str(seed0), *data, "--batch-size", "0")
    assert "--images 1 is out of range: it must be >= 2" in refused(capsys, str(seed0), *data, "--images", "1")
    assert "holds 200 test images; fix: a value in [2, 200]" in refused(capsys, str(seed0), *data, "--images", "201")
    assert not out.exists()

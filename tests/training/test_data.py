import pytest
import torch

from cutmix_pl import cifar
from cutmix_pl.augment import CutMix
from cutmix_pl.data import CIFAR10DataModule


def test_reads_the_official_layout(tiny_cifar):
    train, test = cifar.load(tiny_cifar)
    assert train.images.shape == (640, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and test.labels.shape == (200,)
    assert set(train.labels.tolist()) == set(range(10))


@pytest.mark.parametrize("val_size,n_train,n_val", [(100, 540, 100), (0, 640, 200)])
def test_split_sizes(tiny_cifar, val_size, n_train, n_val):
    dm = CIFAR10DataModule(tiny_cifar, download=False, val_size=val_size)
    dm.setup()
    assert len(dm.split("train").labels) == n_train
    assert len(dm.split("val").labels) == n_val
    assert len(dm.split("test").labels) == 200


@pytest.mark.parametrize("stage,fix", [("fit", r"a value in \[0, 639\]"),
                                       ("validate", "validate on the data the run was trained on")])
def test_val_size_is_checked_where_the_training_set_is_split(tiny_cifar, stage, fix):
    dm = CIFAR10DataModule(tiny_cifar, download=False, val_size=640)  # all 640 training images
    dm.setup("test"), dm.setup("predict")  # the test set alone: no split of the training set
    assert len(dm.split("test").labels) == len(dm.split("predict").labels) == 200
    with pytest.raises(ValueError, match=rf"^data.val_size=640 leaves no training images: the training set has 640; "
                                         rf"fix: {fix}"):
        dm.setup(stage)
    with pytest.raises(ValueError, match=r"\[0, 639\]$"):
        dm.split("train")


def test_a_batch_larger_than_the_training_split_is_refused_at_fit(tiny_cifar):
    dm = CIFAR10DataModule(tiny_cifar, download=False, val_size=100, batch_size=541)  # 540 training images
    dm.setup("test")  # evaluation never batches the training split
    with pytest.raises(ValueError, match=r"^data.batch_size=541 is larger than the training split \(540 images\); "
                                         r"fix: a value in \[2, 540\]"):
        dm.setup("fit")
    CIFAR10DataModule(tiny_cifar, download=False, val_size=100, batch_size=540).setup("fit")


def test_split_is_seeded_and_disjoint(tiny_cifar):
    a, b = (CIFAR10DataModule(tiny_cifar, download=False, val_size=100) for _ in range(2))
    a.setup(), b.setup()
    assert torch.equal(a.split("val").images, b.split("val").images)
    train = {bytes(x.numpy()) for x in a.split("train").images}
    assert not any(bytes(x.numpy()) in train for x in a.split("val").images)


def test_train_size_subset(tiny_cifar):
    dm = CIFAR10DataModule(tiny_cifar, download=False, val_size=100, train_size=300)
    dm.setup()
    assert len(dm.split("train").labels) == 300


def test_training_batches_are_augmented_and_mixed(tiny_cifar):
    dm = CIFAR10DataModule(tiny_cifar, download=False, batch_size=64, val_size=100, mixer=CutMix(alpha=1.0))
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (64, 3, 32, 32)
    batch = dm.transform(images, labels, 0, torch.Generator().manual_seed(0))
    assert batch.images.dtype == torch.float32 and batch.images.shape == (64, 3, 32, 32)
    assert batch.targets.shape == (64, 10) and batch.targets.dtype == torch.float32
    torch.testing.assert_close(batch.targets.sum(1), torch.ones(64))
    assert (batch.lam < 1).any()


def test_eval_batches_are_normalised_only(tiny_cifar):
    dm = CIFAR10DataModule(tiny_cifar, download=False, eval_batch_size=200, val_size=0)
    dm.setup()
    images, labels = next(iter(dm.test_dataloader()))
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(y, labels) and y.dtype == torch.int64
    mean = torch.tensor(cifar.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cifar.STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std)


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 1}, "batch_size=1 .* >= 2"), ({"val_size": 50000}, "val_size"), ({"val_size": -1}, "val_size"),
    ({"mixer": CutMix(num_classes=100)}, "num_classes"),
    ({"train_size": 1}, "train_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(**kwargs)


def test_missing_data_offline_is_one_clear_line(tmp_path):
    with pytest.raises(cifar.DataError) as err:
        cifar.load(tmp_path / "nowhere")
    msg = str(err.value)
    assert "\n" not in msg and "--data.download true" in msg and "cifar-10-batches-py" in msg

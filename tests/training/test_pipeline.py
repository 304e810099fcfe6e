"""The device-resident input pipeline: sampler coverage, shards, the batches gathered from the split."""

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch

from cutmix_pl import cifar
from cutmix_pl.augment import CutMix
from cutmix_pl.data import CIFAR10DataModule, ShardedBatchSampler, TensorBatchLoader
from ranks import as_rank


@pytest.mark.parametrize("size,batch", [(640, 64), (1000, 128), (129, 128), (5, 2)])
def test_every_index_exactly_once_per_epoch_and_a_new_order_each_epoch(size, batch):
    sampler = ShardedBatchSampler(size, batch, shuffle=True, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        seen = torch.cat(batches)
        # a lone last sample waits for the next epoch (BatchNorm cannot train on one); all else appears once
        lone = 1 if size % batch == 1 and size > batch else 0
        assert len(seen) == size - lone and len(set(seen.tolist())) == size - lone
        orders.append(seen)
    assert not torch.equal(orders[0][:50], orders[1][:50])
    again = ShardedBatchSampler(size, batch, shuffle=True, seed=3)
    again.set_epoch(2)
    assert torch.equal(torch.cat(list(again)), orders[2])


@pytest.mark.parametrize("size,world", [(1001, 2), (1001, 3), (1001, 4), (540, 2), (7, 4)])
def test_training_shards_are_disjoint_equal_and_cover_all_but_a_remainder(size, world):
    shards = [ShardedBatchSampler(size, 32, shuffle=True, seed=0, rank=r, world_size=world).shard()
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "every rank must run the same number of steps"
    union = torch.cat(shards)
    assert len(set(union.tolist())) == len(union), "shards overlap"
    assert size - len(union) < world
    lengths = {len(ShardedBatchSampler(size, 32, shuffle=True, rank=r, world_size=world)) for r in range(world)}
    assert len(lengths) == 1


@pytest.mark.parametrize("size,world", [(1001, 1), (1001, 2), (1001, 3), (101, 2), (3, 4)])
def test_eval_shards_cover_every_index_exactly_once(size, world):
    batches = [b for r in range(world) for b in ShardedBatchSampler(size, 100, shuffle=False, rank=r,
                                                                     world_size=world)]
    union = torch.cat(batches)
    assert torch.equal(union, torch.arange(size))


def test_one_shuffled_rank_and_its_loader_cover_every_index_once(tiny_cifar):
    train, _ = cifar.load(tiny_cifar)
    sampler = ShardedBatchSampler(640, 64, shuffle=True, seed=1)
    loader = TensorBatchLoader(train.images, train.labels, sampler)
    seen = torch.cat([idx for idx in sampler])
    assert torch.equal(seen.sort().values, torch.arange(640))
    assert len(loader) == 10 == sum(1 for _ in loader)


@pytest.mark.parametrize("world", [1, 3])
def test_drop_last_gives_training_batches_of_one_shape(world):
    for rank in range(world):
        kept = ShardedBatchSampler(1000, 64, shuffle=True, seed=2, rank=rank, world_size=world, drop_last=True)
        full = ShardedBatchSampler(1000, 64, shuffle=True, seed=2, rank=rank, world_size=world)
        batches, all_batches = list(kept), list(full)
        assert {len(b) for b in batches} == {64} and len(kept) == len(batches) == (1000 // world) // 64
        assert len(all_batches) == len(batches) + 1 and len(all_batches[-1]) < 64
        assert all(torch.equal(a, b) for a, b in zip(batches, all_batches))  # the same batches, the ragged one left out
    evaluation = ShardedBatchSampler(1000, 64, shuffle=False, drop_last=True)  # evaluation sees every image
    assert sum(len(b) for b in evaluation) == 1000
    small = ShardedBatchSampler(40, 64, shuffle=True, drop_last=True)  # smaller than a batch: one batch, not none
    assert [len(b) for b in small] == [40]


def test_lightning_set_epoch_reaches_our_sampler(tiny_cifar):
    """Lightning calls set_epoch on loader.sampler / loader.batch_sampler.sampler only; it must reach us, or every
    epoch replays epoch 0's permutation (and mix_off_epoch never takes effect)."""
    dm = CIFAR10DataModule(str(tiny_cifar), download=False, val_size=100, batch_size=64)
    loader = dm.train_dataloader()
    first = torch.cat(list(loader.batch_sampler))
    _set_sampler_epoch(loader, 3)
    assert loader.batch_sampler.epoch == 3
    assert not torch.equal(torch.cat(list(loader.batch_sampler)), first)


def test_resume_skips_exactly_the_batches_already_done():
    full = ShardedBatchSampler(640, 64, shuffle=True, seed=1)
    full.set_epoch(4)
    batches = list(full)
    resumed = ShardedBatchSampler(640, 64, shuffle=True, seed=1)
    resumed.set_epoch(4)
    resumed.resume_at(4, 3)
    rest = list(resumed)
    assert len(rest) == len(batches) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, batches[3:]))
    assert len(list(resumed)) == len(batches), "the skip applies once"


def test_batches_are_gathered_from_the_resident_tensors(tiny_cifar):
    dm = CIFAR10DataModule(tiny_cifar, download=False, val_size=100, batch_size=64, seed=0)
    loader = dm.train_dataloader()
    train = dm.split("train")
    for idx, (x, y) in zip(loader.batch_sampler, loader):
        assert torch.equal(x, train.images[idx]) and torch.equal(y, train.labels[idx])


def test_global_batch_must_divide_over_processes(tiny_cifar):
    dm = as_rank(CIFAR10DataModule(tiny_cifar, download=False, val_size=100, batch_size=63, eval_batch_size=99), 0, 2)
    with pytest.raises(ValueError, match="data.batch_size=63 .* divisible by the 2 processes"):
        dm.train_dataloader()
    for loader in (dm.val_dataloader, dm.test_dataloader, dm.predict_dataloader):
        with pytest.raises(ValueError, match="data.eval_batch_size=99 .* divisible by the 2 processes"):
            loader()



def test_every_process_needs_images_else_one_line_naming_the_setting(tiny_cifar):
    def on_ranks(world: int, **kwargs) -> CIFAR10DataModule:
        dm = CIFAR10DataModule(tiny_cifar, download=False, batch_size=2 * world, eval_batch_size=world, **kwargs)
        return as_rank(dm, world - 1, world)

    # Exactly enough: one validation image and two training images on each of 4 ranks.
    dm = on_ranks(4, val_size=4, train_size=8)
    assert [len(x) for x, _ in dm.val_dataloader()] == [1] and [len(x) for x, _ in dm.train_dataloader()] == [2]
    for stage in ("fit", "validate"):  # at setup, before any training
        with pytest.raises(ValueError, match=r"^data.val_size=3 gives 4 processes fewer than one validation image"):
            on_ranks(4, val_size=3).setup(stage)
    with pytest.raises(ValueError, match=r"^data.val_size=3 gives 4 processes fewer than one validation image"):
        on_ranks(4, val_size=3).val_dataloader()
    on_ranks(4, val_size=3).setup("test")  # testing does not need the validation split
    with pytest.raises(ValueError, match=r"^the training split has 7 images, too few for 4 processes .* at least 8"):
        on_ranks(4, val_size=4, train_size=7).train_dataloader()
    for name in ("val", "test", "predict"):  # the 200 test images (val_size 0 validates on them too)
        with pytest.raises(ValueError, match=rf"^the test set has 200 images, fewer than the 256 processes of this "
                                             rf"{name} run; fix: at most 200 devices"):
            getattr(on_ranks(256, val_size=0), f"{name}_dataloader")()
    dm = on_ranks(4)
    dm.batch_size = 4
    with pytest.raises(ValueError, match=r"^data.batch_size=4 gives each of the 4 processes fewer than 2 images a step"):
        dm.train_dataloader()


@pytest.mark.cuda
def test_resident_pipeline_on_cuda_keeps_everything_on_the_device(tiny_cifar):
    dm = as_rank(CIFAR10DataModule(tiny_cifar, download=False, val_size=100, batch_size=64, mixer=CutMix()), 0, 1,
                 device="cuda")
    loader = dm.train_dataloader()
    x, y = next(iter(loader))
    assert x.device.type == "cuda" and x.dtype == torch.uint8
    batch = dm.transform(x, y, 0)
    assert batch.images.device.type == "cuda" and batch.targets.device.type == "cuda"

"""Fast, single-process checks of the pieces DDP relies on (the 2-process runs are in test_ddp.py, slow)."""

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch

from cutmix_pl.data import CIFAR10DataModule, ShardedBatchSampler


@pytest.mark.parametrize("resident", [True, False])
def test_lightning_set_epoch_reaches_our_sampler(tiny_cifar, resident):
    """Lightning calls set_epoch on loader.sampler / loader.batch_sampler.sampler only; it must reach us, or every
    epoch replays epoch 0's permutation (and mix_off_epoch never takes effect)."""
    dm = CIFAR10DataModule(str(tiny_cifar), download=False, val_size=100, batch_size=64, resident=resident)
    loader = dm.train_dataloader()
    first = torch.cat([idx for idx in loader.batch_sampler])
    _set_sampler_epoch(loader, 3)
    assert loader.batch_sampler.epoch == 3
    assert not torch.equal(torch.cat([idx for idx in loader.batch_sampler]), first)


@pytest.mark.parametrize("size,world", [(540, 2), (539, 2), (1000, 3), (7, 4)])
def test_training_shards_are_disjoint_equal_and_cover_all_but_a_remainder(size, world):
    shards = [ShardedBatchSampler(size, 8, shuffle=True, seed=5, rank=r, world_size=world).shard()
              for r in range(world)]
    assert {len(s) for s in shards} == {size // world}
    union = torch.cat(shards)
    assert len(union.unique()) == len(union) == size // world * world


@pytest.mark.parametrize("size,world", [(101, 2), (10, 3), (3, 4)])
def test_eval_shards_cover_every_index_once(size, world):
    shards = [ShardedBatchSampler(size, 50, shuffle=False, rank=r, world_size=world).shard() for r in range(world)]
    assert torch.equal(torch.cat(shards), torch.arange(size))


def test_global_batch_must_divide_over_processes(tiny_cifar):
    class FakeTrainer:  # what _topology reads
        class strategy:  # noqa: N801
            root_device = torch.device("cpu")
        global_rank, world_size = 0, 3

    dm = CIFAR10DataModule(str(tiny_cifar), download=False, val_size=100, batch_size=64)
    dm.trainer = FakeTrainer()
    with pytest.raises(ValueError, match="global batch and must be divisible by the 3 processes"):
        dm.train_dataloader()

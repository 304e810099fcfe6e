"""Batches of indices and of tensors for a data set that already sits in memory (host or device).

:class:`ShardedBatchSampler` draws a seeded permutation per epoch on the data's own device and gives each DDP rank
its own shard; :class:`TensorBatchLoader` gathers each batch with one indexing op. No worker processes, no
per-sample Python, no host-to-device copy per step. There is no Lightning import here: Lightning sees a sized
iterable with a ``batch_sampler`` and calls ``set_epoch`` through it as it would on a DataLoader.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["ShardedBatchSampler", "TensorBatchLoader", "check_batch", "check_shards", "mix_seed"]


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 steps), so (seed, rank) pairs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class ShardedBatchSampler:
    """Batches of indices for one rank: a shared-seed permutation per epoch, sharded without overlap.

    All ranks draw the same permutation (same ``seed``, same epoch) and rank r takes every ``world_size``-th
    index from r, so shards are disjoint. In training mode (``shuffle``) every rank gets ``size // world_size``
    indices, so all ranks run the same number of steps (DDP needs that); the few left over change every
    epoch. In eval mode the shards are contiguous and together cover every index exactly once. ``drop_last`` (training
    only) leaves out the ragged last batch, so that every step has the same shape.

    Args:
        size: the number of images in the split.
        batch_size: images per batch on this rank (the global batch divided by ``world_size``).
        shuffle: training (a new permutation each epoch, equal shards) or evaluation (every index once, in order).
        seed: the permutations' seed, the same on every rank.
        rank, world_size: this process and the number of processes.
        device: where the index tensors are made (the device of the data they index).
        drop_last: training only: leave out the ragged last batch.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", drop_last: bool = False) -> None:
        if size < 1 or batch_size < 1:
            raise ValueError(f"size={size} and batch_size={batch_size} must both be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.drop_last = drop_last and shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before every epoch (through ``sampler``, below)."""
        self.epoch = epoch

    @property
    def sampler(self) -> ShardedBatchSampler:
        """Lightning calls ``set_epoch`` only on ``loader.sampler`` and ``loader.batch_sampler.sampler``, never on
        ``loader.batch_sampler`` itself: this makes its per-epoch call reach us (else every epoch is epoch 0)."""
        return self

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Skip the first ``batches_done`` batches the next time ``epoch`` is iterated (mid-epoch resume)."""
        self._resume = (epoch, batches_done)

    def shard(self) -> Tensor:
        """This rank's indices for the current epoch, in order."""
        if not self.shuffle:
            lo = self.rank * self.size // self.world_size
            hi = (self.rank + 1) * self.size // self.world_size
            return torch.arange(lo, hi, device=self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.size, generator=gen, device=self.device)
        per_rank = self.size // self.world_size
        return perm[self.rank :: self.world_size][:per_rank]

    def _bounds(self, count: int) -> list[int]:
        if self.drop_last and count >= self.batch_size:  # a shard smaller than a batch keeps its one batch
            count -= count % self.batch_size
        starts = list(range(0, count, self.batch_size))
        # BatchNorm cannot train on a single sample: a lone last training sample waits for the next epoch.
        if self.shuffle and count - starts[-1] == 1 and len(starts) > 1:
            starts.pop()
            count -= 1
        return starts + [count]

    def __len__(self) -> int:
        count = self.size // self.world_size if self.shuffle else self._shard_len()
        return len(self._bounds(count)) - 1 if count else 0

    def _shard_len(self) -> int:
        return (self.rank + 1) * self.size // self.world_size - self.rank * self.size // self.world_size

    def __iter__(self) -> Iterator[Tensor]:
        indices = self.shard()
        if not len(indices):
            return
        bounds = self._bounds(len(indices))
        skip = 0
        if self._resume is not None:
            if self._resume[0] == self.epoch:
                skip = self._resume[1]
            self._resume = None
        for a, b in zip(bounds[skip:-1], bounds[skip + 1 :]):
            yield indices[a:b]


class TensorBatchLoader:
    """Yields ``(images[idx], labels[idx])`` for each index batch of a sampler, on the tensors' own device.

    An ordinary sized iterable as far as Lightning is concerned: progress bars, ``limit_*_batches``,
    ``val_check_interval`` and ``set_epoch`` (through ``batch_sampler``) work as with a DataLoader.

    Args:
        images, labels: the whole split, on the device the batches are used on.
        batch_sampler: the index batches of this rank.
        with_index: also yield each image's position in the split (``predict``: for the predictions file).
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_sampler: ShardedBatchSampler,
                 with_index: bool = False) -> None:
        self.images, self.labels, self.batch_sampler = images, labels, batch_sampler
        self.with_index = with_index  # predict: each image's position in the split, for the predictions file

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for idx in self.batch_sampler:
            yield (self.images[idx], self.labels[idx], idx) if self.with_index else (self.images[idx], self.labels[idx])


def check_batch(name: str, global_batch: int, world: int) -> None:
    """A global batch must split evenly over the processes, and training needs 2 images per process (BatchNorm)."""
    if global_batch % world:
        key = "batch_size" if name == "train" else "eval_batch_size"
        raise ValueError(f"data.{key}={global_batch} is the global batch and must be divisible by the "
                         f"{world} processes; fix: a multiple of {world}")
    if name == "train" and global_batch < 2 * world:
        raise ValueError(f"data.batch_size={global_batch} gives each of the {world} processes fewer than 2 images "
                         f"a step, and BatchNorm needs 2; fix: a multiple of {world} >= {2 * world}")


def check_shards(name: str, count: int, world: int, val_size: int) -> None:
    """Every process needs a batch of split ``name`` (``count`` images): Lightning stops a rank whose loader is empty
    with a traceback that names no setting, and BatchNorm cannot train on a single image."""
    need = 2 if name == "train" else 1
    if count >= need * world:
        return
    if name == "train":
        raise ValueError(f"the training split has {count} images, too few for {world} processes (each needs at "
                         f"least 2); fix: at least {need * world} (lower data.val_size or raise data.train_size) "
                         "or fewer devices")
    if name == "val" and val_size:
        raise ValueError(f"data.val_size={val_size} gives {world} processes fewer than one validation image "
                         f"each; fix: a value >= {world} or fewer devices")
    raise ValueError(f"the test set has {count} images, fewer than the {world} processes of this {name} run; "
                     f"fix: at most {count} devices")

"""CIFAR-10 as a LightningDataModule with a device-resident, batched input pipeline.

The whole training set (150 MB as uint8) lives on the training device. Each epoch, a seeded permutation is drawn
on that device, every rank takes its own shard, and batches are gathered by index, so there are no worker
processes, no per-sample Python and no host-to-device copy per step. Crop, flip, normalisation and the mixing
(CutMix by default) run as batched tensor ops in ``on_after_batch_transfer``, on whatever device the batch is on
(the CPU path runs the very same ops on CPU tensors). Validation and test batches are only normalised.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from . import cifar
from .augment import Mixer, normalize, random_crop_flip

__all__ = ["CIFAR10DataModule", "ShardedBatchSampler", "TensorBatchLoader", "TrainBatch"]


class TrainBatch(NamedTuple):
    """A training batch after augmentation. ``targets`` are soft [B, K] when mixed, else integer labels."""

    images: Tensor
    targets: Tensor
    labels: Tensor  # each sample's own label
    partner: Tensor  # the label of the image pasted or blended in (== labels where unmixed)
    lam: Tensor  # weight of the own label, float32 [B] (1 where unmixed)
    is_cutmix: Tensor  # bool [B]: mixed by CutMix rather than MixUp


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 steps), so (seed, rank) pairs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class ShardedBatchSampler:
    """Batches of indices for one rank: a shared-seed permutation per epoch, sharded without overlap.

    All ranks draw the same permutation (same ``seed``, same epoch) and rank r takes every ``world_size``-th
    index from r, so shards are disjoint. In training mode (``shuffle``) every rank gets ``size // world_size``
    indices, so all ranks run the same number of steps (DDP needs that); the few left over change every
    epoch. In eval mode the shards are contiguous and together cover every index exactly once.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu") -> None:
        if size < 1 or batch_size < 1:
            raise ValueError(f"size={size} and batch_size={batch_size} must both be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
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


class _HostBatches(torch.utils.data.Dataset):
    """Map-style view for the host DataLoader path: ``__getitems__`` gathers a whole batch in one indexing op."""

    def __init__(self, images: Tensor, labels: Tensor, with_index: bool = False) -> None:
        self.images, self.labels, self.with_index = images, labels, with_index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        item = (self.images[i], self.labels[i])
        return (*item, torch.tensor(i)) if self.with_index else item

    def __getitems__(self, idx: list[int] | Tensor) -> tuple[Tensor, ...]:
        idx = torch.as_tensor(idx)
        return (self.images[idx], self.labels[idx], idx) if self.with_index else (self.images[idx], self.labels[idx])


def _identity(batch: Any) -> Any:
    return batch


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 with batched augmentation and per-sample CutMix on the device that holds the batch.

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py/``.
        download: fetch and md5-check the official archive when the folder is missing (needs internet).
        batch_size: global training batch, split evenly over the DDP processes (it must be divisible by
            their number). Keep it and the learning rate together: see the scaling rule in docs/distributed.md.
        eval_batch_size: global batch for validation, test and predict.
        val_size: training images held out for validation (seeded by ``split_seed``), in [0, 49999].
            0 validates on the test set.
        split_seed: seed of the train/validation split; fixed so that runs with different seeds share it.
        train_size: train on only the first ``train_size`` images of the (seeded, shuffled) training split, for
            quick experiments; null: all of them.
        mixer: batch mixing applied after crop/flip/normalisation: ``CutMix`` (per-sample by default),
            ``MixUp``, ``CutMixUp``, or null for none.
        mix_off_epoch: from this (0-based) epoch on, stop mixing (timm's ``mixup_off_epoch``); negative counts
            from the end of training (-2: the last two epochs unmixed, whatever ``trainer.max_epochs``); null: never.
        crop_padding: zero padding of the random crop, in pixels (4 in He et al. 2016); 0 turns cropping off.
        flip: random horizontal flips.
        resident: keep the training set on the training device (GPU-resident pipeline). False keeps it in
            host memory and feeds batches through a DataLoader (pinned, ``num_workers`` processes).
        num_workers: DataLoader worker processes when ``resident`` is false; the gathers are vectorised,
            so 0 is usually fastest.
        seed: seed of the epoch permutations and augmentation; null follows ``seed_everything``. Each DDP
            rank derives its own augmentation stream from it.
    """

    def __init__(self, data_dir: str = "data", download: bool = True, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 train_size: int | None = None,
                 mixer: Mixer | None = None, mix_off_epoch: int | None = None, crop_padding: int = 4,
                 flip: bool = True, resident: bool = True, num_workers: int = 0, seed: int | None = None) -> None:
        super().__init__()
        # BatchNorm cannot train on a batch of one image, hence a training batch of at least 2.
        for name, value, low in (("batch_size", batch_size, 2), ("eval_batch_size", eval_batch_size, 1),
                                 ("crop_padding", crop_padding, 0), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{name}={value!r} is out of range: it must be an integer >= {low}")
        if not 0 <= val_size < 50_000:
            raise ValueError(f"data.val_size={val_size!r} is out of range: it must lie in [0, 49999] "
                             "(CIFAR-10 has 50000 training images)")
        if train_size is not None and train_size < 2:
            raise ValueError(f"data.train_size={train_size!r} is out of range: it must be >= 2 or null (all)")
        if mixer is not None and mixer.num_classes != self.num_classes:
            raise ValueError(f"data.mixer.num_classes={mixer.num_classes} does not match CIFAR-10's "
                             f"{self.num_classes} classes")
        # TensorBoard's HPARAMS tab shows these next to the model's; the mixer as its readable repr. The second call
        # adds it to hparams_initial, which is what Lightning logs (assigning to self.hparams would not).
        self.save_hyperparameters(ignore=["mixer"])
        self.save_hyperparameters({"mixer": repr(mixer) if mixer is not None else "none"})
        self.data_dir, self.download = data_dir, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.split_seed, self.train_size = val_size, split_seed, train_size
        self.mixer, self.mix_off_epoch = mixer, mix_off_epoch
        self.crop_padding, self.flip = crop_padding, flip
        self.resident, self.num_workers, self.seed = resident, num_workers, seed
        self.classes = cifar.CLASSES
        self._splits: dict[str, cifar.Split] = {}
        self._on_device: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._train_sampler: ShardedBatchSampler | None = None
        self._aug_gen: torch.Generator | None = None
        self._position = (-1, 0)  # (epoch, training batches augmented in it), checkpointed for exact resume
        self._pending_state: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(cifar.CLASSES)

    # -- data ---------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download on one process per node when allowed (Lightning calls this before ``setup``)."""
        if cifar.find(self.data_dir) is None and self.download:
            cifar.download(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            self._load_splits()
        # Lightning calls setup on every rank once the processes are up: a split too small for them fails here,
        # before any training, rather than at the first validation.
        _, _, world = self._topology()
        for name in _STAGE_SPLITS.get(stage or "", ()):
            self._check_enough(name, len(self._splits[name].labels), world)
        if stage == "fit" and self.mixer is not None:
            self._mix_off()  # a from-the-end setting that cannot be resolved fails before training

    def _load_splits(self) -> None:
        train, test = cifar.load(self.data_dir, download_if_missing=False)
        if self.val_size >= len(train.labels):
            raise ValueError(f"data.val_size={self.val_size} leaves no training images: the training set has "
                             f"{len(train.labels)}; use a value in [0, {len(train.labels) - 1}]")
        perm = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size :][: self.train_size]
        self._splits["val"] = cifar.Split(train.images[val_idx], train.labels[val_idx]) if self.val_size else test
        train = cifar.Split(train.images[train_idx], train.labels[train_idx])
        self._splits.update(train=train, test=test, predict=test)

    def split(self, name: str) -> cifar.Split:
        """The uint8 images and labels of ``train``, ``val``, ``test`` or ``predict`` (after ``setup``)."""
        if not self._splits:
            self.setup()
        return self._splits[name]

    # -- loaders ------------------------------------------------------------------------------------
    def _topology(self) -> tuple[torch.device, int, int]:
        trainer = self.trainer
        if trainer is None:
            return torch.device("cpu"), 0, 1
        return trainer.strategy.root_device, trainer.global_rank, trainer.world_size

    def _seed(self) -> int:
        seed = self.seed if self.seed is not None else torch.initial_seed()
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # All ranks must draw the same permutations; under torchrun or srun with `seed_everything: true`
            # each process picked its own random seed, so rank 0's wins.
            seed = trainer.strategy.broadcast(seed, src=0)
        return seed

    def _loader(self, name: str, global_batch: int, shuffle: bool) -> Any:
        device, rank, world = self._topology()
        if global_batch % world:
            key = "batch_size" if name == "train" else "eval_batch_size"
            raise ValueError(f"data.{key}={global_batch} is the global batch and must be divisible by the "
                             f"{world} processes; use a multiple of {world}")
        if name == "train" and global_batch < 2 * world:
            raise ValueError(f"data.batch_size={global_batch} gives each of the {world} processes fewer than 2 images "
                             f"a step, and BatchNorm needs 2; use a multiple of {world} >= {2 * world}")
        split = self.split(name)
        self._check_enough(name, len(split.labels), world)
        home = device if self.resident else torch.device("cpu")
        sampler = ShardedBatchSampler(len(split.labels), global_batch // world, shuffle=shuffle,
                                      seed=self._seed(), rank=rank, world_size=world, device=home)
        if self.resident:
            key = (name, str(device))
            if key not in self._on_device:  # one copy per split and device, made once
                self._on_device[key] = (split.images.to(device), split.labels.to(device))
            return TensorBatchLoader(*self._on_device[key], sampler, with_index=name == "predict")
        return DataLoader(_HostBatches(split.images, split.labels, with_index=name == "predict"),
                          batch_sampler=sampler, collate_fn=_identity,
                          num_workers=self.num_workers, pin_memory=device.type == "cuda",
                          persistent_workers=self.num_workers > 0)

    def _check_enough(self, name: str, count: int, world: int) -> None:
        """Every process needs a batch: Lightning stops a rank whose loader is empty with a traceback that names
        no setting, and BatchNorm cannot train on a single image."""
        need = 2 if name == "train" else 1
        if count >= need * world:
            return
        if name == "train":
            raise ValueError(f"the training split has {count} images, too few for {world} processes (each needs at "
                             f"least 2); use at least {need * world} (lower data.val_size or raise data.train_size) "
                             "or fewer devices")
        if name == "val" and self.val_size:
            raise ValueError(f"data.val_size={self.val_size} gives {world} processes fewer than one validation image "
                             f"each; use a value >= {world} or fewer devices")
        raise ValueError(f"the test set has {count} images, fewer than the {world} processes of this {name} run; "
                         f"use at most {count} devices")

    def train_dataloader(self) -> Any:
        loader = self._loader("train", self.batch_size, shuffle=True)
        self._train_sampler = loader.batch_sampler
        device, rank, _ = self._topology()
        if self._aug_gen is None or self._aug_gen.device != device:
            self._aug_gen = torch.Generator(device=device)
            self._aug_gen.manual_seed(mix_seed(self._seed(), 1 + rank))  # a different stream on every rank
        if self._pending_state is not None:
            self._restore(self._pending_state)
        return loader

    def val_dataloader(self) -> Any:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> Any:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> Any:
        return self._loader("predict", self.eval_batch_size, shuffle=False)

    # -- augmentation -------------------------------------------------------------------------------
    def _normalize(self, images: Tensor) -> Tensor:
        stats = self._stats.get(images.device)
        if stats is None:
            stats = self._stats[images.device] = (torch.tensor(cifar.MEAN, device=images.device),
                                                  torch.tensor(cifar.STD, device=images.device))
        return normalize(images, *stats)

    def _mix_off(self) -> int | None:
        """The first unmixed epoch, with a negative ``mix_off_epoch`` counted back from ``trainer.max_epochs``."""
        off = self.mix_off_epoch
        if off is None or off >= 0:
            return off
        max_epochs = self.trainer.max_epochs if self.trainer is not None else None
        if max_epochs is None or max_epochs < 0:
            raise ValueError(f"data.mix_off_epoch={off} counts from the end of training, but trainer.max_epochs is "
                             f"{max_epochs} (no known end); fix: set trainer.max_epochs, or a mix_off_epoch >= 0")
        if off < -max_epochs:
            raise ValueError(f"data.mix_off_epoch={off} counts back past the start of training "
                             f"(trainer.max_epochs={max_epochs}); fix: a value in [-{max_epochs}, -1], or >= 0")
        return max_epochs + off

    def mixing_on(self, epoch: int) -> bool:
        if self.mixer is None:
            return False
        off = self._mix_off()
        return off is None or epoch < off

    def augment(self, images: Tensor, labels: Tensor, epoch: int = 0,
                generator: torch.Generator | None = None) -> TrainBatch:
        """Training augmentation of a uint8 batch: crop, flip, normalise, then mix (when on for ``epoch``)."""
        if self.crop_padding or self.flip:
            images = random_crop_flip(images, self.crop_padding, self.flip, generator)
        images = self._normalize(images)
        if not self.mixing_on(epoch):
            ones = torch.ones(len(labels), device=labels.device)
            return TrainBatch(images, labels, labels, labels, ones, torch.zeros_like(ones, dtype=torch.bool))
        mixed = self.mixer.mix(images, labels, generator)  # type: ignore[union-attr]
        return TrainBatch(mixed.images, mixed.targets, labels, labels[mixed.index], mixed.lam, mixed.is_cutmix)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, Tensor):  # images alone (the model's example input for its summary): normalise
            return self._normalize(batch)
        images, labels = batch[0], batch[1]
        trainer = self.trainer
        if trainer is not None and trainer.training:
            epoch = self._train_sampler.epoch if self._train_sampler is not None else trainer.current_epoch
            done = self._position[1] if self._position[0] == epoch else 0
            self._position = (epoch, done + 1)
            return self.augment(images, labels, epoch, self._aug_gen)
        return (self._normalize(images), *batch[1:])  # labels (and, for predict, the images' indices)

    # -- checkpointed state: where the epoch stands and the augmentation stream ----------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self._position[0], "batches_done": self._position[1]}
        if self._aug_gen is not None:
            state["aug_rng"] = self._aug_gen.get_state()
            trainer = self.trainer
            if trainer is not None and trainer.world_size > 1:
                # Only rank 0's dict reaches the file, so it carries every rank's stream (all ranks save together).
                states = trainer.strategy.all_gather(state["aug_rng"].to(trainer.strategy.root_device))
                state["aug_rng_per_rank"] = [row.clone() for row in states.cpu()]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)
        if self._train_sampler is not None and self._aug_gen is not None:
            self._restore(self._pending_state)

    def _restore(self, state: dict[str, Any]) -> None:
        self._pending_state = None
        self._position = (state["epoch"], state["batches_done"])
        if self._train_sampler is not None:
            self._train_sampler.resume_at(*self._position)
        if "aug_rng" in state and self._aug_gen is not None:
            _, rank, world = self._topology()
            streams = state.get("aug_rng_per_rank", [state["aug_rng"]])
            if len(streams) == world:
                self._aug_gen.set_state(streams[rank].cpu().clone())  # a view of a shared storage crashes it
            else:  # saved with another number of processes: a new stream per rank, distinct and reproducible
                self._aug_gen.manual_seed(mix_seed(self._seed(), 1 + rank, world, *self._position))


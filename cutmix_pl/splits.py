"""The four splits a DataModule serves (train, val, test, predict), cut from what a reader read.

The validation split is held out of the training set with a fixed seed (``data.val_size``, ``data.split_seed``), so
runs with different seeds share it; a folder dataset's own ``val/`` is used as it is. ``val_size`` 0 validates on the
test set. test and predict never split the training set.
"""

from __future__ import annotations

import torch

from .dataset import ImageSet, Split
from .loaders import ShardedBatchSampler, TensorBatchLoader, check_batch, check_shards

__all__ = ["PREDICT_FROM", "STAGE_SPLITS", "Splits"]

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
PREDICT_FROM = "test"  # the reader's split that predict runs on, in its order (predictions.csv's index and file)


class Splits:
    """The splits of one dataset, and the one-line refusals when a setting leaves a split empty.

    Args:
        data: what the reader read.
        val_size: training images held out for validation (seeded by ``split_seed``); ignored when ``data.val`` is
            given. 0: validate on the test set.
        split_seed: seed of the held-out split.
        train_size: keep only the first ``train_size`` images of the shuffled training split; None: all.
    """

    def __init__(self, data: ImageSet, val_size: int, split_seed: int, train_size: int | None) -> None:
        self.val_size = val_size
        self._on_device: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.train_images = len(data.train.labels)
        self._splits: dict[str, Split] = {"test": data.test}
        self._splits["predict"] = self._splits[PREDICT_FROM]
        if data.val is not None:  # a val/ of its own: all of train/ trains
            self._splits["val"] = data.val
            self._splits["train"] = self._subset(data.train, self._perm(split_seed), train_size)
            return
        if val_size >= self.train_images:
            return  # `get` refuses train and val, naming the setting
        perm = self._perm(split_seed)
        val_idx, train_idx = perm[:val_size], perm[val_size:]
        self._splits["val"] = Split(data.train.images[val_idx], data.train.labels[val_idx]) if val_size else data.test
        self._splits["train"] = self._subset(data.train, train_idx, train_size)

    def _perm(self, seed: int) -> torch.Tensor:
        return torch.randperm(self.train_images, generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def _subset(train: Split, idx: torch.Tensor, train_size: int | None) -> Split:
        idx = idx[:train_size]
        return Split(train.images[idx], train.labels[idx])

    def check(self, stage: str | None, world: int, batch_size: int) -> None:
        """What ``stage`` needs of the splits, on ``world`` processes: Lightning calls setup on every rank once the
        processes are up, so a split too small for them fails there, before any training, rather than at the first
        validation."""
        if stage in ("fit", "validate") and "train" not in self._splits:
            raise ValueError(self.no_training_images(stage))
        for name in STAGE_SPLITS.get(stage or "", ()):
            check_shards(name, len(self.get(name).labels), world, self.val_size)
        if stage == "fit" and batch_size > (n := len(self.get("train").labels)):
            # one batch of the whole split, or none with drop_last: never what was meant, and the first can exhaust
            # the memory before any step
            raise ValueError(f"data.batch_size={batch_size} is larger than the training split ({n} images); "
                             f"fix: a value in [2, {n}] (data.batch_size is the global batch)")

    def get(self, name: str) -> Split:
        if name in ("train", "val") and name not in self._splits:
            raise ValueError(self.no_training_images(None))
        return self._splits[name]

    def loader(self, name: str, global_batch: int, shuffle: bool, seed: int, device: torch.device, rank: int,
               world: int, drop_last: bool) -> TensorBatchLoader:
        """Batches of split ``name`` for this rank, gathered on ``device``, where the split is copied once."""
        check_batch(name, global_batch, world)
        split = self.get(name)
        check_shards(name, len(split.labels), world, self.val_size)
        sampler = ShardedBatchSampler(len(split.labels), global_batch // world, shuffle=shuffle, seed=seed,
                                      rank=rank, world_size=world, device=device, drop_last=drop_last)
        key = (name, str(device))
        if key not in self._on_device:  # one copy per split and device, made once
            self._on_device[key] = (split.images.to(device), split.labels.to(device))
        return TensorBatchLoader(*self._on_device[key], sampler, with_index=name == "predict")

    def no_training_images(self, stage: str | None) -> str:
        n = self.train_images
        # validate of a run takes the run's split from its checkpoint (runs.rules.split_from_checkpoint)
        fix = ("validate on the data the run was trained on (validate takes the run's split from its checkpoint)"
               if stage == "validate" else f"a value in [0, {n - 1}]")
        return f"data.val_size={self.val_size} leaves no training images: the training set has {n}; fix: {fix}"

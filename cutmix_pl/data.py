"""The DataModule: one dataset reader (``data.dataset``), its splits and loaders, with the training transform applied
on the device.

The reader (``readers.py``: CIFAR-10, CIFAR-100, a folder of images) reads uint8 tensors; the whole dataset then lives
on the training device (``loaders.py``: 184 MB for CIFAR-10), checked to fit before it is read (``memory.py``). Each
training batch goes through :class:`~cutmix_pl.transform.TrainTransform` once it is on its device
(``on_after_batch_transfer``): crop, flip, normalisation and per-sample CutMix as batched tensor ops, the GPU-side
collate step. Validation and test batches are only normalised. The splits are cut in ``splits.py``; the checkpointed
position and random stream are kept in ``train_state.py``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .augment import CutMix, Mixer
from .dataset import Reader, Split
from .loaders import ShardedBatchSampler, TensorBatchLoader, mix_seed
from .memory import check_fits
from .randaugment import RandAugment
from .readers import make_reader
from .splits import Splits
from .train_state import TrainState, gather_streams
from .transform import TrainBatch, TrainTransform

__all__ = ["CIFAR10DataModule", "ShardedBatchSampler", "TensorBatchLoader", "TrainBatch", "mix_seed"]



def _check_arguments(reader: Reader, batch_size: int, eval_batch_size: int, val_size: int,
                     train_size: int | None) -> None:
    """The DataModule's argument checks, at construction: one line each, naming the value, the range and the fix."""
    # BatchNorm cannot train on a batch of one image, hence a training batch of at least 2.
    for name, value, low in (("batch_size", batch_size, 2), ("eval_batch_size", eval_batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"data.{name}={value!r} is out of range: it must be an integer >= {low}; fix: "
                             f"pass --data.{name} with such a value (the recipe's is in cutmix_pl/configs/cutmix.yaml)")
    n = reader.train_images  # known before reading (a reader's constant, a folder's listing); None: checked at setup
    if val_size < 0 or (n is not None and val_size >= n):
        top = n - 1 if n is not None else "the training images - 1"
        raise ValueError(f"data.val_size={val_size!r} is out of range: it must lie in [0, {top}] ({reader.name} has "
                         f"{n if n is not None else 'a number of'} training images); fix: pass --data.val_size in "
                         f"that range{f' (e.g. {n // 10})' if n is not None and n >= 10 else ''}, or 0 to validate "
                         "on the test set")
    if train_size is not None and train_size < 2:
        raise ValueError(f"data.train_size={train_size!r} is out of range: it must be >= 2 or null (all); fix: "
                         "pass such a value, or null to train on the whole training split")


def _topology(trainer: L.Trainer | None) -> tuple[torch.device, int, int]:
    """(device, rank, number of processes) of a run; the CPU and one process outside a Trainer."""
    if trainer is None:
        return torch.device("cpu"), 0, 1
    return trainer.strategy.root_device, trainer.global_rank, trainer.world_size


def _check_memory(reader: Reader, trainer: L.Trainer | None) -> None:
    """Refuse a dataset that cannot be held on the device, before reading or decoding it (cheap: no image read)."""
    check_fits(reader.nbytes(), _topology(trainer)[0], reader.describe(), reader.image_size)


def _check_same_dataset(saved: str, reader: Reader) -> None:
    """A resume or an evaluation reads the data the run was trained on, or is refused in one line."""
    if saved != reader.describe():
        raise ValueError(f"the checkpoint's run was trained on {saved}, this command reads {reader.describe()}; fix: "
                         "pass the run's data.dataset and data settings, or leave out --ckpt_path to start a new run")


def _shared_seed(seed: int | None, trainer: L.Trainer | None) -> int:
    """``data.seed``, else torch's; rank 0's on every rank."""
    seed = seed if seed is not None else torch.initial_seed()
    if trainer is not None and trainer.world_size > 1:
        # All ranks must draw the same permutations; under torchrun or srun with `seed_everything: true` each
        # process picked its own random seed, so rank 0's wins.
        seed = trainer.strategy.broadcast(seed, src=0)
    return seed


def _as_input(trainer: L.Trainer | None, images: Tensor) -> Tensor:
    """Images in the precision's input type (bf16 for bf16-true, float64 for 64-true; unchanged for the mixed
    precisions): Lightning converts a batch before ``on_after_batch_transfer``, when it is still uint8, so the float
    images made there are converted there. Targets stay float32, so the loss against them is taken in float32."""
    return trainer.precision_plugin.convert_input(images) if trainer is not None else images


# The class keeps its name for every dataset: Lightning files the DataModule's state under the class's __qualname__
# in a checkpoint, so a renamed class would silently drop every existing run's position and stream on resume.
class CIFAR10DataModule(L.LightningDataModule):
    """Splits and loaders of one dataset (CIFAR-10 by default); a TrainTransform augments batches on their device.

    Args:
        data_dir: cifar10: the folder that holds (or will hold) ``cifar-10-batches-py/``; cifar100: the same for
            ``cifar-100-python/``; folder: ROOT, which holds ``train/<class>/*`` and ``test/<class>/*``.
        download: fetch and md5-check the official archive when the folder is missing (needs internet; CIFAR only).
        batch_size: global training batch, split evenly over the DDP processes (it must be divisible by
            their number). Keep it and the learning rate together: see the scaling rule in docs/distributed.md.
        eval_batch_size: global batch for validation, test and predict.
        val_size: training images held out for validation (seeded by ``split_seed``), in [0, training images - 1];
            0 validates on the test set; a folder's own ``val/`` replaces it. test and predict never split train.
        split_seed: seed of the train/validation split; fixed so that runs with different seeds share it.
        train_size: train on only the first ``train_size`` images of the (seeded, shuffled) training split, for
            quick experiments; null: all of them.
        mixer: batch mixing applied after crop/flip/normalisation: ``CutMix`` (per-sample, alpha 1, prob 0.5 by
            default, the paper's CIFAR setting), ``MixUp``, ``CutMixUp``, ``Cutout`` (a hole per image, the hard
            labels kept), or null for none. Its ``num_classes`` must be the dataset's.
        mix_off_epoch: from this (0-based) epoch on, stop mixing (timm's ``mixup_off_epoch``); negative counts
            from the end of training (-2: the last two epochs unmixed, whatever ``trainer.max_epochs``); null: never.
        crop_padding: zero padding of the random crop, in pixels (4 in He et al. 2016); 0 turns cropping off.
        flip: random horizontal flips.
        randaugment: RandAugment per image on the device, after crop/flip and before mixing
            (``cutmix_pl.randaugment.RandAugment``: ``num_ops``, ``magnitude``, ...); null: off.
        seed: seed of the epoch permutations and augmentation; null follows ``seed_everything``. Each DDP
            rank derives its own augmentation stream from it.
        drop_last: leave out each epoch's ragged last training batch, so that every step has the same shape (a new
            shape is a new graph for ``model.compile: reduce-overhead``, CUDA graphs).
        compile_transform: ``torch.compile`` the transform's arithmetic (crop/flip, normalisation, mixing) into a few
            fused kernels, for GPUs, where per-sample CutMix's many small kernels cost launches. The same draws, so
            the same boxes and labels; the normalisation may round differently by one float32 ulp.
        dataset: ``cifar10`` (the default), ``cifar100`` (``cifar100_labels``), ``folder`` (a folder of your own
            images, decoded once into a cache), or the dotted path of a reader of your own (a
            ``cutmix_pl.dataset.Reader`` subclass; docs/design.md, "Datasets").
        image_size: folder: resize every image once (shorter side, then a centre crop) to this square size, in
            [8, 4096]; needed when the images' sizes differ; null: their common size. CIFAR: null (32x32).
        cifar100_labels: cifar100: ``fine`` (100 classes) or ``coarse`` (20 superclasses).
        cache_dir: folder: where the decoded images are kept (``cutmix_pl-cache-<size>.npz``); null: ``data_dir``.
    """

    def __init__(self, data_dir: str = "data", download: bool = True, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 train_size: int | None = None, mixer: Mixer | None = CutMix(alpha=1.0, prob=0.5),
                 mix_off_epoch: int | None = None, crop_padding: int = 4, flip: bool = True,
                 randaugment: RandAugment | None = None, seed: int | None = None, drop_last: bool = False,
                 compile_transform: bool = False, dataset: str = "cifar10", image_size: int | None = None,
                 cifar100_labels: Literal["fine", "coarse"] = "fine", cache_dir: str | None = None) -> None:
        super().__init__()
        self.reader = make_reader(dataset, data_dir, image_size, labels=cifar100_labels, cache_dir=cache_dir)
        _check_arguments(self.reader, batch_size, eval_batch_size, val_size, train_size)
        # a mixer's num_classes null (the default) is the data's; another one is refused in one line
        mixer = mixer.bind_classes(self.reader.num_classes, self.reader.describe()) if mixer is not None else None
        # Known for CIFAR; a folder's are computed with its cache, so until ``setup`` reads them they are neutral.
        mean, std = self.reader.stats or ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.transform = TrainTransform(mixer, mix_off_epoch, crop_padding, flip, mean, std,
                                        randaugment=randaugment, compile=compile_transform)
        # TensorBoard's HPARAMS tab shows these next to the model's; the mixer and RandAugment as their readable repr.
        self.save_hyperparameters(ignore=["mixer", "randaugment"])
        self.save_hyperparameters({"mixer": repr(mixer) if mixer is not None else "none",
                                   "randaugment": repr(randaugment) if randaugment is not None else "none"})
        self.data_dir, self.download = data_dir, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.split_seed, self.train_size = val_size, split_seed, train_size
        self.seed, self.drop_last = seed, drop_last
        self._splits: Splits | None = None
        self._state = TrainState(self.transform)  # checkpointed for an exact resume

    # -- what the data says to the rest: classes, statistics, size --------------------------------------
    @property
    def num_classes(self) -> int:
        return self.reader.num_classes

    @property
    def classes(self) -> tuple[str, ...]:
        return self.reader.classes

    @property
    def mean(self) -> tuple[float, ...]:  # per channel in [0, 1]: published for CIFAR, computed for a folder
        return self.transform.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.transform.std

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) of every image; None for a folder dataset of native size before it is read."""
        return self.reader.image_size

    @property
    def mixer(self) -> Mixer | None:
        return self.transform.mixer

    # -- data ---------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download, or decode a folder into its cache, on one process per node (Lightning: before ``setup``)."""
        _check_memory(self.reader, self.trainer)
        self.reader.prepare(self.download)

    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            _check_memory(self.reader, self.trainer)
            data = self.reader.read()
            self.transform.set_stats(data.mean, data.std)
            self._splits = Splits(data, self.val_size, self.split_seed, self.train_size)
        self._splits.check(stage, _topology(self.trainer)[2], self.batch_size)
        if self.trainer is not None:
            self.transform.max_epochs = self.trainer.max_epochs
        if stage == "fit" and self.mixer is not None:
            off = self.transform.mix_off()  # a from-the-end setting that cannot be resolved fails before training
            end = self.transform.max_epochs
            if off is not None and end is not None and 0 <= end <= off:
                rank_zero_warn(f"data.mix_off_epoch={self.transform.mix_off_epoch} is not before trainer.max_epochs="
                               f"{end}, so every epoch mixes; fix: a mix_off_epoch below {end} (or negative, from "
                               "the end), or null to say that every epoch mixes")

    def split(self, name: str) -> Split:
        """The uint8 images and labels of ``train``, ``val``, ``test`` or ``predict`` (after ``setup``)."""
        return self._ready().get(name)

    def _ready(self) -> Splits:
        if self._splits is None:
            self.setup()
        return self._splits

    # -- loaders: each split once on its device, batches gathered there by index ----------------------
    def _seed(self) -> int:
        return _shared_seed(self.seed, self.trainer)

    def _loader(self, name: str, global_batch: int, shuffle: bool) -> Any:
        device, rank, world = _topology(self.trainer)
        return self._ready().loader(name, global_batch, shuffle, self._seed(), device, rank, world, self.drop_last)

    def train_dataloader(self) -> Any:
        loader = self._loader("train", self.batch_size, shuffle=True)
        device, rank, world = _topology(self.trainer)
        gen = self.transform.generator
        if gen is None or gen.device != device:
            self.transform.seed(mix_seed(self._seed(), 1 + rank), device)  # a different stream on every rank
        self._state.attach(loader.batch_sampler, rank, world, self._seed)  # restores a resumed run's position
        return loader

    def val_dataloader(self) -> Any:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> Any:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> Any:
        return self._loader("predict", self.eval_batch_size, shuffle=False)

    # -- the batch on its device: the training transform, or normalisation only ---------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, Tensor):  # images alone (the model's example input for its summary): normalise
            return _as_input(self.trainer, self.transform.normalize(batch))
        images, labels = batch[0], batch[1]
        trainer = self.trainer
        if trainer is not None and trainer.training:
            epoch = self._state.step(trainer.current_epoch)
            out = self.transform(images, labels, epoch)
            return out._replace(images=_as_input(self.trainer, out.images))
        # labels (and, for predict, the images' indices) as they are
        return (_as_input(self.trainer, self.transform.normalize(images)), *batch[1:])

    # -- checkpointed state: where the epoch stands, the augmentation stream, which dataset ---------
    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer  # with several processes, rank 0's file carries every rank's stream
        gather = gather_streams(trainer.strategy) if trainer is not None and trainer.world_size > 1 else None
        return {**self._state.state_dict(gather), "dataset": self.reader.describe()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_same_dataset(state_dict.get("dataset", "cifar10"), self.reader)  # older runs: all CIFAR-10
        _, rank, world = _topology(self.trainer)
        self._state.load_state_dict(state_dict, rank, world, self._seed)

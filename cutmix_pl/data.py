"""CIFAR-10 as a LightningDataModule: splits and loaders, with the training transform applied on the device.

The whole training set (150 MB as uint8) lives on the training device (``loaders.py``). Each training batch goes
through :class:`~cutmix_pl.transform.TrainTransform` once it is on its device (``on_after_batch_transfer``): crop,
flip, normalisation and per-sample CutMix as batched tensor ops, the GPU-side collate step. Validation and test
batches are only normalised.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from . import cifar
from .augment import CutMix, Mixer
from .loaders import ShardedBatchSampler, TensorBatchLoader, check_batch, check_shards, mix_seed
from .randaugment import RandAugment
from .transform import TrainBatch, TrainTransform

__all__ = ["CIFAR10DataModule", "ShardedBatchSampler", "TensorBatchLoader", "TrainBatch", "mix_seed"]

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 splits and loaders; training batches go through a :class:`TrainTransform` on their device.

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py/``.
        download: fetch and md5-check the official archive when the folder is missing (needs internet).
        batch_size: global training batch, split evenly over the DDP processes (it must be divisible by
            their number). Keep it and the learning rate together: see the scaling rule in docs/distributed.md.
        eval_batch_size: global batch for validation, test and predict.
        val_size: training images held out for validation (seeded by ``split_seed``), in [0, 49999].
            0 validates on the test set. test and predict do not split the training set.
        split_seed: seed of the train/validation split; fixed so that runs with different seeds share it.
        train_size: train on only the first ``train_size`` images of the (seeded, shuffled) training split, for
            quick experiments; null: all of them.
        mixer: batch mixing applied after crop/flip/normalisation: ``CutMix`` (per-sample, alpha 1, prob 0.5 by
            default, the paper's CIFAR setting), ``MixUp``, ``CutMixUp``, ``Cutout`` (a hole per image, the hard
            labels kept), or null for none.
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
        compile_transform: ``torch.compile`` the training transform's arithmetic (crop/flip, normalisation,
            mixing) into a few fused kernels, for GPUs, where the many small kernels of per-sample CutMix cost
            launches. The same draws, so the same boxes and labels; the normalisation may round differently by one
            float32 ulp.
    """

    def __init__(self, data_dir: str = "data", download: bool = True, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 train_size: int | None = None, mixer: Mixer | None = CutMix(alpha=1.0, prob=0.5),
                 mix_off_epoch: int | None = None, crop_padding: int = 4, flip: bool = True,
                 randaugment: RandAugment | None = None, seed: int | None = None, drop_last: bool = False,
                 compile_transform: bool = False) -> None:
        super().__init__()
        # BatchNorm cannot train on a batch of one image, hence a training batch of at least 2.
        for name, value, low in (("batch_size", batch_size, 2), ("eval_batch_size", eval_batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{name}={value!r} is out of range: it must be an integer >= {low}; fix: "
                                 f"pass --data.{name} with such a value (the recipe's is in cutmix_pl/configs/cutmix.yaml)")
        if not 0 <= val_size < 50_000:
            raise ValueError(f"data.val_size={val_size!r} is out of range: it must lie in [0, 49999] "
                             "(CIFAR-10 has 50000 training images); fix: e.g. 5000, or 0 to validate on the test set")
        if train_size is not None and train_size < 2:
            raise ValueError(f"data.train_size={train_size!r} is out of range: it must be >= 2 or null (all); fix: "
                             "pass such a value, or null to train on the whole training split")
        if mixer is not None and mixer.num_classes != self.num_classes:
            raise ValueError(f"data.mixer.num_classes={mixer.num_classes} does not match CIFAR-10's "
                             f"{self.num_classes} classes; fix: data.mixer.init_args.num_classes {self.num_classes}")
        self.transform = TrainTransform(mixer, mix_off_epoch, crop_padding, flip, cifar.MEAN, cifar.STD,
                                        randaugment=randaugment, compile=compile_transform)
        # TensorBoard's HPARAMS tab shows these next to the model's; the mixer and RandAugment as their readable repr.
        self.save_hyperparameters(ignore=["mixer", "randaugment"])
        self.save_hyperparameters({"mixer": repr(mixer) if mixer is not None else "none",
                                   "randaugment": repr(randaugment) if randaugment is not None else "none"})
        self.data_dir, self.download = data_dir, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.split_seed, self.train_size = val_size, split_seed, train_size
        self.seed, self.drop_last = seed, drop_last
        self.classes = cifar.CLASSES
        self._splits: dict[str, cifar.Split] = {}
        self._train_images = 0
        self._on_device: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        self._train_sampler: ShardedBatchSampler | None = None
        self._position = (-1, 0)  # (epoch, training batches augmented in it), checkpointed for exact resume
        self._pending_state: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(cifar.CLASSES)

    @property
    def mixer(self) -> Mixer | None:
        return self.transform.mixer

    # -- data ---------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download on one process per node when allowed (Lightning calls this before ``setup``)."""
        if cifar.find(self.data_dir) is None and self.download:
            cifar.download(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            self._load_splits()
        if stage in ("fit", "validate") and "train" not in self._splits:
            raise ValueError(self._no_training_images(stage))
        # Lightning calls setup on every rank once the processes are up: a split too small for them fails here,
        # before any training, rather than at the first validation.
        _, _, world = self._topology()
        for name in _STAGE_SPLITS.get(stage or "", ()):
            check_shards(name, len(self.split(name).labels), world, self.val_size)
        if stage == "fit" and self.batch_size > (n := len(self.split("train").labels)):
            # one batch of the whole split, or none with drop_last: never what was meant, and the first can exhaust
            # the memory before any step
            raise ValueError(f"data.batch_size={self.batch_size} is larger than the training split ({n} images); "
                             f"fix: a value in [2, {n}] (data.batch_size is the global batch)")
        if self.trainer is not None:
            self.transform.max_epochs = self.trainer.max_epochs
        if stage == "fit" and self.mixer is not None:
            self.transform.mix_off()  # a from-the-end setting that cannot be resolved fails before training

    def _load_splits(self) -> None:
        train, test = cifar.load(self.data_dir, download_if_missing=False)
        self._splits.update(test=test, predict=test)
        self._train_images = len(train.labels)
        if self.val_size >= len(train.labels):
            return  # test and predict never split the training set; `split` refuses train and val
        perm = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size :][: self.train_size]
        self._splits["val"] = cifar.Split(train.images[val_idx], train.labels[val_idx]) if self.val_size else test
        self._splits["train"] = cifar.Split(train.images[train_idx], train.labels[train_idx])

    def split(self, name: str) -> cifar.Split:
        """The uint8 images and labels of ``train``, ``val``, ``test`` or ``predict`` (after ``setup``)."""
        if not self._splits:
            self.setup()
        if name in ("train", "val") and name not in self._splits:
            raise ValueError(self._no_training_images(None))
        return self._splits[name]

    def _no_training_images(self, stage: str | None) -> str:
        n = self._train_images
        # validate of a run takes the run's split from its checkpoint (settings.split_from_checkpoint)
        fix = ("validate on the data the run was trained on (validate takes the run's split from its checkpoint)"
               if stage == "validate" else f"a value in [0, {n - 1}]")
        return f"data.val_size={self.val_size} leaves no training images: the training set has {n}; fix: {fix}"

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
        check_batch(name, global_batch, world)
        split = self.split(name)
        check_shards(name, len(split.labels), world, self.val_size)
        sampler = ShardedBatchSampler(len(split.labels), global_batch // world, shuffle=shuffle,
                                      seed=self._seed(), rank=rank, world_size=world, device=device,
                                      drop_last=self.drop_last)
        key = (name, str(device))
        if key not in self._on_device:  # one copy per split and device, made once
            self._on_device[key] = (split.images.to(device), split.labels.to(device))
        return TensorBatchLoader(*self._on_device[key], sampler, with_index=name == "predict")

    def train_dataloader(self) -> Any:
        loader = self._loader("train", self.batch_size, shuffle=True)
        self._train_sampler = loader.batch_sampler
        device, rank, _ = self._topology()
        gen = self.transform.generator
        if gen is None or gen.device != device:
            self.transform.seed(mix_seed(self._seed(), 1 + rank), device)  # a different stream on every rank
        if self._pending_state is not None:
            self._restore(self._pending_state)
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
            return self._as_input(self.transform.normalize(batch))
        images, labels = batch[0], batch[1]
        trainer = self.trainer
        if trainer is not None and trainer.training:
            epoch = self._train_sampler.epoch if self._train_sampler is not None else trainer.current_epoch
            done = self._position[1] if self._position[0] == epoch else 0
            self._position = (epoch, done + 1)
            out = self.transform(images, labels, epoch)
            return out._replace(images=self._as_input(out.images))
        # labels (and, for predict, the images' indices) as they are
        return (self._as_input(self.transform.normalize(images)), *batch[1:])

    def _as_input(self, images: Tensor) -> Tensor:
        """Images in the precision's input type (bf16 for bf16-true, float64 for 64-true; unchanged for the mixed
        precisions): Lightning converts a batch before this hook, when it is still uint8, so the float images made
        here are converted here. Targets stay float32, so the loss against them is taken in float32."""
        trainer = self.trainer
        return trainer.precision_plugin.convert_input(images) if trainer is not None else images

    # -- checkpointed state: where the epoch stands and the augmentation stream ----------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self._position[0], "batches_done": self._position[1]}
        rng = self.transform.state_dict().get("rng")
        if rng is not None:
            state["aug_rng"] = rng
            trainer = self.trainer
            if trainer is not None and trainer.world_size > 1:
                # Only rank 0's dict reaches the file, so it carries every rank's stream (all ranks save together).
                states = trainer.strategy.all_gather(rng.to(trainer.strategy.root_device))
                state["aug_rng_per_rank"] = [row.clone() for row in states.cpu()]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)
        if self._train_sampler is not None and self.transform.generator is not None:
            self._restore(self._pending_state)

    def _restore(self, state: dict[str, Any]) -> None:
        self._pending_state = None
        self._position = (state["epoch"], state["batches_done"])
        if self._train_sampler is not None:
            self._train_sampler.resume_at(*self._position)
        if "aug_rng" in state and self.transform.generator is not None:
            _, rank, world = self._topology()
            streams = state.get("aug_rng_per_rank", [state["aug_rng"]])
            # A stream continues only in a generator of its kind: a CPU generator's state (5056 bytes) does not
            # fit a CUDA one (16: seed and offset), and a resume may move a run between CPU and GPU.
            fits = streams[0].numel() == self.transform.generator.get_state().numel()
            if len(streams) == world and fits:
                self.transform.load_state_dict({"rng": streams[rank]})
            else:  # saved with another number of processes or on another kind of device: a new stream per rank,
                # distinct and reproducible
                self.transform.seed(mix_seed(self._seed(), 1 + rank, world, *self._position),
                                    self.transform.generator.device)

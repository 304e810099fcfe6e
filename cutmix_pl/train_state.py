"""Where a training epoch stands and the augmentation stream: the DataModule's part of a checkpoint.

A resumed run skips the batches its epoch had done and continues each rank's augmentation stream, so that it ends
as the uninterrupted run would (``tests/runs/test_resume.py``). There is no Lightning import here: the DataModule passes
in the rank, the number of processes and a gather of every rank's stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .loaders import ShardedBatchSampler, mix_seed
from .transform import TrainTransform

__all__ = ["TrainState", "gather_streams"]


def gather_streams(strategy: Any) -> Callable[[Tensor], list[Tensor]]:
    """Every rank's stream from a Lightning strategy: only rank 0's dict reaches the file, so it carries them all
    (all ranks save together)."""

    def gather(rng: Tensor) -> list[Tensor]:
        return [row.clone() for row in strategy.all_gather(rng.to(strategy.root_device)).cpu()]

    return gather


class TrainState:
    """(epoch, training batches augmented in it) and the transform's random stream, saved and restored.

    Args:
        transform: the training transform whose generator is saved.
    """

    def __init__(self, transform: TrainTransform) -> None:
        self.transform = transform
        self.position = (-1, 0)
        self.sampler: ShardedBatchSampler | None = None
        self._pending: dict[str, Any] | None = None

    def step(self, trainer_epoch: int) -> int:
        """One more training batch augmented; its epoch: the sampler's (Lightning's ``trainer_epoch`` without one)."""
        epoch = self.sampler.epoch if self.sampler is not None else trainer_epoch
        done = self.position[1] if self.position[0] == epoch else 0
        self.position = (epoch, done + 1)
        return epoch

    def state_dict(self, gather: Callable[[Tensor], list[Tensor]] | None) -> dict[str, Any]:
        """``gather``: every rank's stream (DDP; only rank 0's dict reaches the file), None with one process."""
        state: dict[str, Any] = {"epoch": self.position[0], "batches_done": self.position[1]}
        rng = self.transform.state_dict().get("rng")
        if rng is not None:
            state["aug_rng"] = rng
            if gather is not None:
                state["aug_rng_per_rank"] = gather(rng)
        return state

    def load_state_dict(self, state: dict[str, Any], rank: int, world: int, seed: Callable[[], int]) -> None:
        """Restored now when the loader and the stream exist, else when ``attach`` makes them."""
        self._pending = dict(state)
        if self.sampler is not None and self.transform.generator is not None:
            self._restore(rank, world, seed)

    def attach(self, sampler: ShardedBatchSampler, rank: int, world: int, seed: Callable[[], int]) -> None:
        """The training loader's sampler, once ``train_dataloader`` made it and seeded the stream."""
        self.sampler = sampler
        if self._pending is not None:
            self._restore(rank, world, seed)

    def _restore(self, rank: int, world: int, seed: Callable[[], int]) -> None:
        state, self._pending = self._pending, None
        assert state is not None
        self.position = (state["epoch"], state["batches_done"])
        if self.sampler is not None:
            self.sampler.resume_at(*self.position)
        gen = self.transform.generator
        if "aug_rng" in state and gen is not None:
            streams = state.get("aug_rng_per_rank", [state["aug_rng"]])
            # A stream continues only in a generator of its kind: a CPU generator's state (5056 bytes) does not
            # fit a CUDA one (16: seed and offset), and a resume may move a run between CPU and GPU.
            fits = streams[0].numel() == gen.get_state().numel()
            if len(streams) == world and fits:
                self.transform.load_state_dict({"rng": streams[rank]})
            else:  # saved with another number of processes or on another kind of device: a new stream per rank,
                # distinct and reproducible
                self.transform.seed(mix_seed(seed(), 1 + rank, world, *self.position), gen.device)

"""The static-shape engine on a GPU: the network's forward and backward captured as CUDA graphs
(``model.compile: reduce-overhead``), one batch shape (``data.drop_last``), the transform compiled."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli_runs import small
from cutmix_pl.cli import main


def losses(data_dir, *extra):
    cli = main(["fit", *small(data_dir), "--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed",
                "--model.channels_last", "true", "--data.drop_last", "true", "--trainer.max_epochs", "34",
                "--model.lr_schedule", "constant", "--model.warmup_epochs", "0", *extra])
    acc = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0}).Reload()
    return torch.tensor([e.value for e in acc.Scalars("train/loss")])


@pytest.mark.cuda
def test_graph_captured_training_follows_the_plain_step(tiny_cifar, in_tmp):
    """About 200 steps each. A captured graph that replayed stale inputs would repeat losses or stop learning; the
    compiled kernels round differently in bf16, so the trajectories agree closely at first and on average later."""
    plain = losses(tiny_cifar)
    graphs = losses(tiny_cifar, "--model.compile", "reduce-overhead", "--data.compile_transform", "true")
    assert len(plain) == len(graphs) >= 200
    assert torch.allclose(graphs[:5], plain[:5], rtol=0.05)
    assert len(set(graphs.tolist())) > 0.9 * len(graphs)  # new batches every step, not a replayed one
    assert abs(graphs[-30:].mean() - plain[-30:].mean()) < 0.1 * plain[-30:].mean()
    assert graphs[-30:].mean() < 0.8 * graphs[:5].mean()  # it learns

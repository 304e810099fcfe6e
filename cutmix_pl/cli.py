"""``python -m cutmix_pl {fit,validate,test,predict}``: the Lightning CLI over the model and the DataModule.

With no ``--config``, ``configs/cutmix.yaml`` (the default recipe) is loaded; each further ``--config`` is
applied on top of it, then command-line flags.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .data import CIFAR10DataModule
from .module import ImageClassifier

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "cutmix.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class CutMixCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        if trainer.precision is None:  # bf16 autocast where it pays (GPUs); full precision on CPUs
            on_gpu = torch.cuda.is_available() and trainer.accelerator in ("auto", "gpu", "cuda")
            trainer.precision = "bf16-mixed" if on_gpu else "32-true"


def main(args: list[str] | None = None) -> CutMixCLI | None:
    """Run the CLI. Errors in our own argument and data checks end in one line and exit status 2."""
    defaults = [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else []
    try:
        return CutMixCLI(
            ImageClassifier,
            CIFAR10DataModule,
            # Our loaders shard themselves (see data.ShardedBatchSampler), so Lightning must not re-wrap them.
            trainer_defaults={"use_distributed_sampler": False},
            parser_kwargs={cmd: {"default_config_files": defaults} for cmd in SUBCOMMANDS},
            auto_configure_optimizers=False,
            args=args,
        )
    except (ValueError, FloatingPointError) as err:
        if os.environ.get("CUTMIX_PL_TRACEBACK"):
            raise
        print(f"cutmix-pl: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None

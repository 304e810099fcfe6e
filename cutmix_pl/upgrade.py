"""Upgrade a checkpoint written before the network became ``model.net`` (when it recorded ``model.depth``,
``model.width`` and ``model.shortcut``), so that ``validate``, ``test``, ``predict`` and ``load_from_checkpoint``
take it::

    python -m cutmix_pl.upgrade runs/cutmix/version_0/checkpoints/last.ckpt upgraded.ckpt

The weights are untouched; only the recorded hyperparameters move under ``net`` (class ``cutmix_pl.resnet.ResNet``).
The new file is written as checkpoints are (``checkpoint_io.atomic_save``), so an interrupted upgrade leaves no
half-written file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint_io import CheckpointWriteError, atomic_save

OLD_KEYS = ("depth", "width", "shortcut")


def is_old(checkpoint: dict[str, Any]) -> bool:
    hparams = checkpoint.get("hyper_parameters") or {}
    return "net" not in hparams and any(k in hparams for k in OLD_KEYS)


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint with its ResNet settings recorded as ``net`` (in place; returned for convenience)."""
    if is_old(checkpoint):
        hparams = checkpoint["hyper_parameters"]
        init_args = {k: hparams.pop(k) for k in OLD_KEYS if k in hparams}
        init_args["num_classes"] = hparams.get("num_classes", 10)
        hparams["net"] = {"class_path": "cutmix_pl.resnet.ResNet", "init_args": init_args}
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    if args.new.resolve() == args.old.resolve():
        parser.error("NEW must differ from OLD: the original stays as it is")
    checkpoint = torch.load(args.old, map_location="cpu", weights_only=True)
    if not is_old(checkpoint):
        print(f"cutmix-pl: {args.old} already records model.net; nothing to do", file=sys.stderr)
        raise SystemExit(1)
    try:
        atomic_save(upgrade(checkpoint), args.new)
    except CheckpointWriteError:
        print(f"cutmix-pl: error: could not write {args.new}; nothing was left half-written; fix: free space or "
              "pass another NEW path", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"cutmix-pl: wrote {args.new} (model.net: {checkpoint['hyper_parameters']['net']})", file=sys.stderr)


if __name__ == "__main__":
    main()

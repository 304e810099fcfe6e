"""ResNet on CIFAR-10 with per-sample, GPU-batched CutMix (Yun et al. 2019), driven by the Lightning CLI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the re-exports, for type checkers and IDEs ("X as X": an explicit re-export)
    from .augment import CutMix as CutMix, CutMixUp as CutMixUp, Cutout as Cutout, Mixer as Mixer, MixUp as MixUp
    from .data import CIFAR10DataModule as CIFAR10DataModule
    from .module import ImageClassifier as ImageClassifier, SoftTargetCrossEntropy as SoftTargetCrossEntropy
    from .resnet import ResNet as ResNet
    from .transform import TrainTransform as TrainTransform

# Imported on first use (PEP 562): `python -m cutmix_pl` imports this package before its __main__ can take a signal,
# and torch and Lightning take seconds to import.
_EXPORTS = {"CutMix": "augment", "CutMixUp": "augment", "Cutout": "augment", "Mixer": "augment", "MixUp": "augment",
            "CIFAR10DataModule": "data", "ImageClassifier": "module", "SoftTargetCrossEntropy": "module",
            "ResNet": "resnet", "TrainTransform": "transform"}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

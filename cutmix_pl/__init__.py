"""ResNet on CIFAR-10 with per-sample, GPU-batched CutMix (Yun et al. 2019), driven by the Lightning CLI."""

from .augment import CutMix, CutMixUp, Mixer, MixUp
from .data import CIFAR10DataModule
from .module import ImageClassifier, SoftTargetCrossEntropy
from .resnet import ResNet
from .transform import TrainTransform

__all__ = ["CutMix", "CutMixUp", "Mixer", "MixUp", "CIFAR10DataModule", "ImageClassifier",
           "SoftTargetCrossEntropy", "ResNet", "TrainTransform"]
__version__ = "0.1.0"

"""The network as a setting: ``model.net`` built from its YAML form (``class_path`` + ``init_args``), recorded in
that form in checkpoints and TensorBoard's HPARAMS, and compared with a checkpoint's record before loading."""

from __future__ import annotations

import importlib
from typing import Any

from torch import Tensor, nn

from .checks import require
from .resnet import ResNet

__all__ = ["build", "check_compatible", "describe", "make_network", "net_differences"]


def build(spec: dict[str, Any]) -> Any:
    """An object from ``{"class_path": "pkg.mod.Class", "init_args": {...}}``, the form the YAML configs use."""
    module, _, name = str(spec.get("class_path", "")).rpartition(".")
    if not module:
        raise ValueError(f"{spec!r} names no class; fix: give class_path as package.module.Class")
    return getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))


def describe(obj: Any, init_args: dict[str, Any]) -> dict[str, Any]:
    """The ``{"class_path", "init_args"}`` form of an object (the inverse of :func:`build`)."""
    cls = type(obj)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}


def net_differences(saved: dict[str, Any], built: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, built value) for each way two ``model.net`` records differ: the class, then the init
    arguments both name (``num_classes`` aside: the model checks it)."""
    if saved.get("class_path") != built.get("class_path"):
        return [("class_path", saved.get("class_path"), built.get("class_path"))]
    a, b = saved.get("init_args") or {}, built.get("init_args") or {}
    return [(k, a[k], b[k]) for k in a if k in b and k != "num_classes" and a[k] != b[k]]


def make_network(net: nn.Module | dict[str, Any] | None, num_classes: int) -> nn.Module:
    """``model.net`` as built: ResNet-20 when None, rebuilt from a checkpoint's record (a dict), checked to be a
    module for the data's classes."""
    if net is None:
        return ResNet(num_classes=num_classes)
    if isinstance(net, dict):  # a checkpoint's record, loaded outside the CLI
        net = build({**net, "init_args": {**(net.get("init_args") or {}), "num_classes": num_classes}})
    require(isinstance(net, nn.Module), "model.net", net, "is not a torch.nn.Module",
            "class_path (e.g. cutmix_pl.resnet.ResNet) and init_args in YAML")
    theirs = getattr(net, "num_classes", num_classes)
    if theirs != num_classes:
        raise ValueError(f"model.net has num_classes={theirs} but the model has num_classes={num_classes}; fix: "
                         "build the network for the data's classes (the CLI links them)")
    return net


def check_compatible(checkpoint: dict[str, Any], ours: Any, num_classes: int, own: dict[str, Tensor],
                     where: str | None = None) -> None:
    """A checkpoint of another network than ``ours`` (a ``model.net`` record, for ``num_classes``, with the state
    ``own``) fails here in one line, not in load_state_dict's size dump."""
    what = f"the checkpoint {where}" if where else "the checkpoint"
    saved = checkpoint.get("hyper_parameters") or {}
    theirs = saved.get("net")
    if isinstance(theirs, dict) and isinstance(ours, dict):
        diffs = net_differences(theirs, ours)
        if saved.get("num_classes", num_classes) != num_classes:
            diffs.append(("num_classes", saved["num_classes"], num_classes))
        if diffs:
            old = ", ".join(f"{k}={a!r}" for k, a, _ in diffs)
            new = ", ".join(f"{k}={b!r}" for k, _, b in diffs)
            # num_classes comes from the data, not a flag: another one needs another checkpoint
            flags = " ".join(f"--model.net.{k} {a}" for k, a, _ in diffs if k != "num_classes")
            fix = ("use a checkpoint trained on this data set" if any(k == "num_classes" for k, _, _ in diffs)
                   else f"pass {flags}")
            raise ValueError(f"{what} holds a model with {old} but this run builds {new}; fix: {fix}, "
                             "or leave out --ckpt_path to train from scratch")
    state = {k.replace("._orig_mod.", "."): v for k, v in (checkpoint.get("state_dict") or {}).items()}
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if state and (missing or extra):  # settings that do not describe the weights (an edited or foreign file)
        lack = f"lack {len(missing)} of this model's tensors (e.g. {missing[0]})" if missing else ""
        hold = f"hold {len(extra)} it does not have (e.g. {extra[0]})" if extra else ""
        raise ValueError(f"{what} does not fit this model: its weights {' and '.join(t for t in (lack, hold) if t)}, "
                         "so the network settings it records do not describe them; fix: pass a .ckpt file whose "
                         "settings and weights belong together (as this project's fit writes them)")
    for key, value in state.items():
        if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{what} does not fit this model: {key} has shape {list(value.shape)} there and "
                             f"{list(own[key].shape)} here; fix: pass the --model.net settings it was trained with "
                             "(e.g. --model.net.depth, --model.net.width), or "
                             "leave out --ckpt_path to train from scratch")

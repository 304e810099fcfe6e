"""Decide: what one command does with the runs it names (new run, resume, evaluate, or refuse), and the settings it
runs with. Pure functions of the parsed config and of what ``disk.read`` saw; nothing here reads or writes files.

- ``fit --ckpt_path last`` resumes the one unfinished run of that ``save_dir/name`` whose saved config matches this
  command's (keys of :data:`MAY_CHANGE` aside); none or several is a one-line error listing the candidates, a run
  with a damaged file among them.
- A resume may change only the keys of :data:`MAY_CHANGE`; any other changed setting is refused by name. A run is
  finished when its last.ckpt holds its config's ``max_steps`` (when > 0) or ``max_epochs``.
- Settings left to the machine (precision, memory format) are chosen and recorded; a resume keeps the run's.
- A checkpoint's model settings are taken, its network class only when the command names it (a class is code).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from functools import cache
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jsonargparse import Namespace

from .. import hardware
from ..nets import net_differences
from .console import plain, shown
from .recipes import recipe

if TYPE_CHECKING:
    from .disk import RunOnDisk, Seen

# THE list of settings a resume may change (patterns over the flattened config): how to run or report, not what is
# trained (or, for max_epochs/max_steps, how long: the schedule follows the new end). Its model.* entries are also
# the model's *run options*: an evaluation or a resume takes them from the command, not from the checkpoint.
MAY_CHANGE = (
    "ckpt_path", "config", "__default_config__", "weights_only", "trainer.logger", "trainer.logger.*",
    "trainer.max_epochs", "trainer.max_steps", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.strategy.*", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.log_every_n_steps", "trainer.limit_val_batches", "trainer.limit_test_batches",
    "trainer.limit_predict_batches", "trainer.check_val_every_n_epoch", "trainer.num_sanity_val_steps",
    # which files a ModelCheckpoint keeps (runs started while the recipe had save_last: true keep the current one's)
    "trainer.callbacks.*.init_args.save_last",
    "data.data_dir", "data.download", "data.eval_batch_size", "data.compile_transform",
    "model.compile", "model.channels_last", "model.tta_flip", "model.log_images", "model.grid_size",
    # filled in from data.num_classes by the CLI's links, so not a setting of its own
    "model.num_classes", "model.net.init_args.num_classes",
)
# Null leaves these to the start (patterns over the flattened config): a run found for a resume matches whatever it
# chose, and keeps that choice. The precision is the machine's; a mixer's num_classes (CutMixUp's halves' too) the
# data's, which runs started before it could be null recorded as a number.
CHOSEN_WHEN_NULL = ("trainer.precision", "data.mixer.init_args.num_classes", "data.mixer.init_args.*.num_classes")
# DataModule arguments that say which training images were held out for validation: ``validate`` takes the run's.
SPLIT_KEYS = ("val_size", "split_seed")
# DataModule arguments that say which data a run trained on: an evaluation of the run reads that data.
DATASET_KEYS = ("dataset", "cifar100_labels", "image_size")


@dataclass
class Decision:
    """What a command does: ``mode`` (new, resume, evaluate, unlogged; None: writes nowhere of its own), from which
    checkpoint, into which folder, and the lines to print about it."""

    mode: str | None = None
    ckpt: str | None = None
    checkpoint: dict[str, Any] | None = None
    folder: Path | None = None  # resume/evaluate/unlogged: the folder; new: None (a version_N is claimed)
    taken: dict[str, Any] = field(default_factory=dict)  # the checkpoint's model settings the command takes
    resumed_dirs: set[Path] = field(default_factory=set)  # checkpoint folders of the run a fit continues
    purge_step: int | None = None  # TensorBoard: hide the events from this step on (logged again)
    notes: list[str] = field(default_factory=list)


def decide(sub: str, cfg: Namespace, seen: Seen, base: Path | None) -> Decision:
    """The decision for ``cfg`` (completed in place: the choices made for the user, the checkpoint's path)."""
    if sub != "fit" and cfg.get("ckpt_path") is None:
        raise ValueError(f"{sub} needs --ckpt_path: without one it would evaluate an untrained network; fix: pass a "
                         "run folder (runs/<name>/version_N), a .ckpt file, or last (the newest run's last.ckpt)")
    d = Decision(ckpt=seen.ckpt, checkpoint=seen.checkpoint)
    resumed, run = seen.run_config, seen.run
    if seen.candidates:
        found = find_resumable(base, seen.candidates, plain(cfg))
        d.ckpt, d.checkpoint, resumed, run = (str(found.folder / "checkpoints" / "last.ckpt"), found.checkpoint,
                                              found.config, found.folder.absolute())
    if seen.newest:
        d.notes.append(f"--ckpt_path last is {shown(Path(d.ckpt))}")
    if d.checkpoint is not None and (not isinstance(d.checkpoint, dict)
                                     or not {"state_dict", "pytorch-lightning_version"} <= d.checkpoint.keys()):
        raise ValueError(f"--ckpt_path {d.ckpt} is not a Lightning checkpoint (no state_dict, or no "
                         "pytorch-lightning_version); fix: pass a .ckpt file written by this project")
    if d.checkpoint is not None:
        cfg.ckpt_path = d.ckpt
    resumed = resumed if sub == "fit" and d.checkpoint is not None else None
    choose_for_machine(cfg, resumed or {}, sub == "fit", d.notes)
    if cfg.get("seed_everything") is True and is_seed((resumed or {}).get("seed_everything")):
        cfg.seed_everything = resumed["seed_everything"]  # the seed the run chose: its data order goes on as it was
    if d.checkpoint is not None:
        d.taken = checked_hparams(cfg, d.checkpoint, d.notes)
        if sub == "fit" and resumed is None:
            check_loose_checkpoint(cfg, d.taken, d.notes)
        if sub != "fit":
            dataset_from_checkpoint(cfg, d.checkpoint, d.notes, seen.data_dir)
            split_from_checkpoint(cfg, d.checkpoint, d.notes if sub == "validate" else [])
    _place(d, sub, cfg, resumed, run, logged=base is not None)
    return d


def _place(d: Decision, sub: str, cfg: Namespace, resumed: dict[str, Any] | None, run: Path | None,
           logged: bool) -> None:
    """Where the command writes: an evaluation into ``<run>/<command>/`` beside the run's logs, a resume into the run,
    a new fit into a new version_N (or, without a logger, trainer.default_root_dir)."""
    if sub != "fit":
        if d.checkpoint is not None and logged:
            d.mode, d.folder, d.purge_step = "evaluate", run / sub, 0
        return
    if not logged:
        d.mode, d.folder = "unlogged", Path(cfg.trainer.get("default_root_dir") or ".").absolute()
        if resumed is not None and run == d.folder:
            d.mode, d.resumed_dirs = "continue unlogged", _checkpoint_dirs(d.checkpoint)
        return
    if resumed is None:
        d.mode = "new"
        return
    changes = changed_settings(resumed, plain(cfg))
    if changes:
        raise ValueError(f"cannot resume {run} with changed settings: {describe_changes(changes)}; fix: leave them "
                         f"as the run has them ({run}/config.yaml), or leave out --ckpt_path to start a new run with "
                         "them")
    d.mode, d.folder, d.resumed_dirs = "resume", run, _checkpoint_dirs(d.checkpoint)
    # TensorBoard hides the run's events from the checkpoint's step on, which the resumed run logs again (after a
    # kill, steps past the newest checkpoint were logged once already)
    d.purge_step = int(d.checkpoint.get("global_step", 0))
    d.notes.append(f"resuming {shown(Path(d.ckpt))} (the run continues in {shown(run)})")


def _checkpoint_dirs(checkpoint: dict[str, Any]) -> set[Path]:
    """The ModelCheckpoint folders a checkpoint records (an explicit dirpath may lie outside the run)."""
    states = checkpoint.get("callbacks")
    dirs = [s.get("dirpath") for s in (states.values() if isinstance(states, dict) else []) if isinstance(s, dict)]
    return {Path(x) for x in dirs if isinstance(x, str) and x}


# -- which run ``last`` means ----------------------------------------------------------------------------------
def is_finished(config: dict[str, Any] | None, progress: tuple[int, int]) -> bool:
    """Whether a run's last.ckpt progress (epochs, step) holds the end its config asks for."""
    trainer = (config or {}).get("trainer") or {}
    epochs, step = progress
    max_steps, max_epochs = trainer.get("max_steps") or -1, trainer.get("max_epochs")
    if max_steps > 0 and step >= max_steps:
        return True
    return max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs


def find_resumable(base: Path, found: list[RunOnDisk], current: dict[str, Any]) -> RunOnDisk:
    """The run ``fit --ckpt_path last`` continues: the one unfinished run whose saved config matches ``current``."""
    open_runs, done, other = [], [], []
    for run in found:
        changes = changed_settings(run.config, current) if run.config is not None else []
        why = run.config_error or (describe_changes(changes, 2) if changes else None)
        if why is None and run.config is None:
            why = "no config.yaml"
        if why is None and run.checkpoint_error:
            why = run.checkpoint_error
        if why is None:
            (done if is_finished(run.config, run.progress) else open_runs).append(run)
        else:
            other.append(f"{run.folder.name}: {why}")
    if len(open_runs) == 1:
        return open_runs[0]
    if open_runs:
        names = ", ".join(str(r.folder) for r in open_runs)
        raise ValueError(f"--ckpt_path last is ambiguous: {len(open_runs)} unfinished runs with this config ({names}); "
                         "fix: pass --ckpt_path with the run folder to resume")
    if done:
        raise ValueError(f"--ckpt_path last continues unfinished runs only, and the run with this config, "
                         f"{done[-1].folder}, has finished; fix: to train it longer, pass --ckpt_path "
                         f"{done[-1].folder} (with a larger --trainer.max_epochs or --trainer.max_steps), or leave out "
                         "--ckpt_path to start a new run")
    raise ValueError(f"--ckpt_path last found no run in {base} with this command's settings ({'; '.join(other[-4:])}); "
                     "fix: repeat the run's settings, pass --ckpt_path RUN_FOLDER (a resume then refuses changed "
                     "settings by name), or leave out --ckpt_path to start a new run")


# -- what a resume may change ------------------------------------------------------------------------------------
def may_change(key: str) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in MAY_CHANGE)


def run_options() -> tuple[str, ...]:
    """The model arguments that say how to run the network (from :data:`MAY_CHANGE`): the command's own."""
    return tuple(k[len("model."):] for k in MAY_CHANGE if k.startswith("model.") and "." not in k[len("model."):]
                 and k != "model.num_classes")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}``; lists of dicts (callbacks) keep their position: ``a.0.b``."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, dict) for v in tree):
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = list(tree) if isinstance(tree, tuple) else tree
    return out


def is_seed(value: Any) -> bool:
    """A seed a run recorded: ``seed_everything: true`` is written down as the integer it chose."""
    return isinstance(value, int) and not isinstance(value, bool)


def same_value(a: Any, b: Any) -> bool:
    """Equal, with numbers compared to a relative 1e-9 (a float read back from YAML)."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


@cache
def data_defaults() -> dict[str, Any]:
    """The DataModule's arguments with a default, by name; read when first needed (the DataModule imports
    Lightning, which this module does not)."""
    from ..data import CIFAR10DataModule

    return {name: p.default for name, p in inspect.signature(CIFAR10DataModule.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def changed_settings(saved: dict[str, Any], current: dict[str, Any],
                     defaults: dict[str, Any] | None = None) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, this command's value)`` for every setting outside :data:`MAY_CHANGE` that differs.

    A DataModule argument the run's config does not record (it predates the argument) and that this command leaves
    at its default (``defaults``, by name; the DataModule's when None) is no change: the run ran as that default.
    """
    old, new = flatten(saved), flatten(current)

    def chosen(k: str) -> bool:  # left to the start (null, or a seed of true): matches what the run recorded
        return ((new.get(k) is None and any(fnmatchcase(k, pattern) for pattern in CHOSEN_WHEN_NULL))
                or (k == "seed_everything" and new.get(k) is True and is_seed(old.get(k))))

    def predates(k: str) -> bool:  # an argument added since the run started, at its default
        if k in old or not k.startswith("data.") or "." in k[len("data."):]:
            return False
        known = data_defaults() if defaults is None else defaults
        name = k[len("data."):]
        return name in known and same_value(known[name], new.get(k))

    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if not may_change(k) and not chosen(k) and not same_value(old.get(k), new.get(k)) and not predates(k)]


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    text = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in changes[:limit])
    return text + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


# -- the settings a command runs with ------------------------------------------------------------------------------
def choose_for_machine(cfg: Namespace, resumed: dict[str, Any], training: bool, notes: list[str]) -> None:
    """Precision and memory format left null: the fastest measured safe here (``hardware.py``), recorded in
    config.yaml; a resumed run keeps what it ran with. bf16 asked for where it is emulated is warned about."""
    trainer, model = cfg.trainer, cfg.model
    if trainer.precision is not None:
        warning = hardware.bf16_warning(trainer.precision, trainer.accelerator)
        notes.extend([warning] if warning else [])
    if trainer.precision is None:
        trainer.precision = (resumed.get("trainer") or {}).get("precision")
    if model.get("channels_last") is None:
        model.channels_last = (resumed.get("model") or {}).get("channels_last")
    if trainer.precision is None or model.channels_last is None:
        choice, chosen = hardware.choose(trainer.accelerator), []
        hint = choice.hint if trainer.precision is None and training else ""  # about training precision
        if trainer.precision is None:
            trainer.precision = choice.precision
            chosen.append(f"trainer.precision={choice.precision}")
        if model.channels_last is None:
            model.channels_last = choice.channels_last
            chosen.append(f"model.channels_last={str(choice.channels_last).lower()}")
        notes.append(f"{', '.join(chosen)} (the fastest measured safe on {choice.why}; set them to override)"
                     + (f"; {hint}" if hint else ""))


def checked_hparams(cfg: Namespace, checkpoint: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The checkpoint's model settings this command takes: all but the run options. Its network class must be the
    command's: a class named by a file is code that loading it would import and run."""
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams, dict) or not isinstance(hparams.get("net", {}), dict):
        raise ValueError(f"--ckpt_path {cfg.ckpt_path} records its model settings in an unknown form "
                         f"({type(hparams).__name__}); fix: pass a .ckpt file written by this project")
    saved, asked = hparams.get("net"), plain(cfg.model.get("net"))
    if isinstance(saved, dict) and isinstance(asked, dict):
        diffs = net_differences(saved, asked)
        recipe_net = (recipe().get("model") or {}).get("net") or {"class_path": "cutmix_pl.resnet.ResNet"}
        if diffs and (diffs[0][0] == "class_path" or net_differences(recipe_net, asked)):
            old = ", ".join(f"{k}={a!r}" for k, a, _ in diffs)
            new = ", ".join(f"{k}={b!r}" for k, _, b in diffs)
            if diffs[0][0] == "class_path":
                flags = f"--model.net {diffs[0][1]}"
                why = " (a network class is code: it is taken from a checkpoint only when the command names it)"
            else:
                flags, why = " ".join(f"--model.net.{k} {a}" for k, a, _ in diffs), " (or leave them out)"
            raise ValueError(f"--ckpt_path {cfg.ckpt_path} holds a model with {old} but the config asks for {new}; "
                             f"fix: pass {flags}{why}, or leave out --ckpt_path to train from scratch")
        notes.extend(f"model.net {key}={old!r} from the checkpoint" for key, old, _ in diffs)
    return {k: v for k, v in hparams.items() if k not in run_options() and not k.startswith("_")}


def check_loose_checkpoint(cfg: Namespace, taken: dict[str, Any], notes: list[str]) -> None:
    """``fit --ckpt_path`` of a checkpoint outside a run folder trains on with the model settings it records: one
    that this command sets otherwise (it differs from the recipe) is refused rather than ignored; the others named."""
    saved, asked, default = flatten(taken), flatten(plain(cfg.model)), flatten(recipe().get("model") or {})
    differ = [k for k in sorted(set(saved) & set(asked)) if not same_value(saved[k], asked[k])
              and not k.startswith(("net.", "num_classes"))]
    refused = [k for k in differ if k in default and not same_value(default[k], asked[k])]
    if refused:
        text = ", ".join(f"model.{k} ({saved[k]!r} there, {asked[k]!r} asked)" for k in refused)
        raise ValueError(f"--ckpt_path {cfg.ckpt_path} continues with the model settings it was trained with, but this "
                         f"command asks for others: {text}; fix: leave them out, or leave out --ckpt_path to start a "
                         "new run with them")
    notes.extend(f"model.{key}={saved[key]!r} from the checkpoint" for key in differ)


def dataset_from_checkpoint(cfg: Namespace, checkpoint: dict[str, Any], notes: list[str],
                            data_dir: str | None = None) -> None:
    """An evaluation reads the data its run trained on: the dataset settings this command leaves at their defaults
    are the checkpoint's (so ``test --ckpt_path RUN`` needs no data flags), and so is the data folder (``data_dir``:
    the run's, where it is still there); another dataset named is refused."""
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    if not isinstance(saved, dict):
        return
    if data_dir is not None and data_dir != cfg.data.get("data_dir") and same_value(cfg.data.get("data_dir"),
                                                                                     data_defaults().get("data_dir")):
        notes.append(f"data.data_dir={data_dir!r} from the checkpoint: the folder its run read")
        cfg.data.data_dir = data_dir
    for key in DATASET_KEYS:
        if key not in saved or key not in cfg.data or same_value(saved[key], cfg.data[key]):
            continue
        if not same_value(cfg.data[key], data_defaults().get(key)):
            raise ValueError(f"data.{key}={cfg.data[key]!r}, but the checkpoint's run was trained with "
                             f"data.{key}={saved[key]!r}; fix: leave data.{key} out (an evaluation reads the data of "
                             "its run), or pass a checkpoint trained on that data")
        notes.append(f"data.{key}={saved[key]!r} from the checkpoint: the data its run was trained on")
        cfg.data[key] = saved[key]


def split_from_checkpoint(cfg: Namespace, checkpoint: dict[str, Any], notes: list[str]) -> None:
    """``validate`` validates on its run's held-out images: another split would hold images the run trained on.
    ``test`` and ``predict`` never split, but take the run's split too (unnoted), so that a ``val_size`` fitted to a
    small dataset is not checked against the recipe's default."""
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    for key in SPLIT_KEYS:
        if isinstance(saved, dict) and key in saved and key in cfg.data and saved[key] != cfg.data[key]:
            notes.append(f"data.{key}={saved[key]!r} from the checkpoint, not {cfg.data[key]!r}: the run's validation "
                         "split (another would hold images it trained on)")
            cfg.data[key] = saved[key]

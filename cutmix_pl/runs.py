"""Run management: where a run lives, which checkpoint a command means, and what a resume may change.

A *run* is one folder, ``<save_dir>/<name>/version_N``, holding ``config.yaml``, the TensorBoard events and
``checkpoints/`` (one ``last.ckpt``, always the newest state). The rules, all enforced here:

- A new ``fit`` claims the next ``version_N`` with an atomic ``mkdir``; every command holds a lock on the folder it
  writes into while it runs, so a second process cannot write into it at the same time.
- What a run is comes from its own files: its settings from its newest config file, its progress from ``last.ckpt``
  (finished when that holds the run's ``max_epochs`` or ``max_steps``). No marker file that a failed command could
  leave behind or take away.
- ``fit --ckpt_path last`` resumes the unfinished run of that ``save_dir/name`` whose saved config matches this
  command's (keys of :data:`MAY_CHANGE` aside). None, or several: a one-line error that lists the candidates, a run
  with a damaged file among them (never a traceback).
- A resume may change only the keys of :data:`MAY_CHANGE`; any other changed setting is refused by name.

Plain functions over paths and dicts; ``run_plan.py`` applies them to a parsed config.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import shutil
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = ["CHOSEN_WHEN_NULL", "FIT_FILES", "LOCK", "MAY_CHANGE", "RunLock", "changed_settings", "claim_version",
           "clear_temporary", "find_resumable", "flatten", "is_finished", "newest_last", "outermost_missing",
           "remove_failed", "run_of_checkpoint", "run_options", "same_value", "saved_config", "snapshot",
           "symlinks_in"]

# THE list of settings a resume may change (patterns over the flattened config): how to run or report, not what is
# trained (or, for max_epochs/max_steps, how long: the learning-rate schedule follows the new end). Everything else
# must equal the run's saved config. Its model.* entries are also the model's *run options*: an evaluation or a
# resume takes them from the command, not from the checkpoint. A new model option that says how to run is named here
# and nowhere else; one that changes what is trained is named nowhere.
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
# Settings that null leaves to the machine (settings.choose_for_machine): a run found for a resume matches whatever it
# chose, and the resume keeps that choice.
CHOSEN_WHEN_NULL = ("trainer.precision",)
LOCK = ".lock"
# What a fit writes into its folder itself; without a logger, whose folder may hold anything, all it may touch there
FIT_FILES = ("config.yaml", "config.resume*.yaml", "checkpoints", LOCK)


def may_change(key: str) -> bool:
    return _matches(key, MAY_CHANGE)


def _matches(name: str, patterns: tuple[str, ...] | None) -> bool:
    """Whether ``name`` matches one of the glob ``patterns``; None: every name does."""
    return patterns is None or any(fnmatchcase(name, pattern) for pattern in patterns)


def run_options() -> tuple[str, ...]:
    """The model arguments that say how to run the network (from :data:`MAY_CHANGE`): a command's own, whatever the
    checkpoint recorded."""
    return tuple(k[len("model."):] for k in MAY_CHANGE if k.startswith("model.") and "." not in k[len("model."):]
                 and k != "model.num_classes")


# -- where a run lives -------------------------------------------------------------------------------------
def run_of_checkpoint(ckpt: str | Path) -> Path:
    """The run folder of a checkpoint: the parent of ``checkpoints/``, else the file's own folder."""
    parent = Path(ckpt).absolute().parent
    return parent.parent if parent.name == "checkpoints" else parent


def _version_number(folder: Path) -> int | None:
    m = re.fullmatch(r"version_(\d+)", folder.name)
    return int(m.group(1)) if m else None


def claim_version(base: Path) -> Path:
    """Create and return the next free ``base/version_N``. ``mkdir`` is atomic: of two processes that race for
    the same N, one wins and the other moves on to N+1."""
    base.mkdir(parents=True, exist_ok=True)
    taken = [n for d in base.iterdir() if (n := _version_number(d)) is not None]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (base / f"version_{n}").mkdir()
            return base / f"version_{n}"
        except FileExistsError:
            n += 1


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, held while a command writes into the folder (released at exit,
    also when the process is killed: the kernel drops the lock with the file descriptor)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        # O_NOFOLLOW: a planted link named .lock must not make this open (and truncate) a file elsewhere
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"{self.path.parent} is in use by another running command (pid {holder}); fix: wait "
                             "for it to end (or stop it), then run this command again") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def clear_temporary(folder: Path, only: tuple[str, ...] | None = None) -> None:
    """Remove the temporary files of writes killed half-way (``.NAME.*.tmp``; the targets are intact), of the names
    matching ``only`` when given. Only under the folder's lock: no other command is writing there."""
    for stale in folder.glob(".*.tmp"):
        if _matches(stale.name[1:].rsplit(".", 2)[0], only) and (stale.is_file() or stale.is_symlink()):
            stale.unlink(missing_ok=True)


def symlinks_in(folder: Path, only: tuple[str, ...] | None = None) -> list[Path]:
    """The folder itself, its entries (those matching ``only`` when given) and those of its ``checkpoints/`` that
    are symbolic links: a write through one would land outside the run."""
    found = [folder] if folder.is_symlink() else []
    if folder.is_dir() and not folder.is_symlink():
        found += [p for p in _named(folder, only) if p.is_symlink()]
        ckpts = folder / "checkpoints"
        if ckpts.is_dir() and not ckpts.is_symlink():
            found += [p for p in ckpts.iterdir() if p.is_symlink()]
    return found


# -- a run's own files ---------------------------------------------------------------------------------------
def saved_config(run: Path) -> dict[str, Any] | None:
    """The newest config the run was (re)started with: ``config.yaml`` or the highest ``config.resumeK.yaml``.
    Raises ValueError, naming the file, when it cannot be read."""
    files = [(0, run / "config.yaml")] if (run / "config.yaml").is_file() else []
    # an empty resume config is a resume killed as it began, by a version that wrote it in place: not a config
    files += [(int(m.group(1)), p) for p in run.glob("config.resume*.yaml")
              if (m := re.fullmatch(r"config\.resume(\d+)\.yaml", p.name)) and p.stat().st_size > 0]
    if not files:
        return None
    path = max(files)[1]
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, UnicodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds no config")
    return config


def read_progress(ckpt: Path) -> tuple[int, int]:
    """(epochs done, global step) that a checkpoint holds, read without its tensors' data (memory-mapped).
    Raises ValueError when it cannot be read."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        epochs = state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
        return int(epochs), int(state["global_step"])
    except Exception as err:  # truncated zip, not a Lightning checkpoint, a global a weights-only load refuses, ...
        raise ValueError(f"{ckpt} cannot be read ({type(err).__name__})") from None


def is_finished(run: Path, config: dict[str, Any] | None = None) -> bool:
    """Whether the run's ``last.ckpt`` holds the end its config asks for (``max_steps`` when > 0, else
    ``max_epochs``). Raises ValueError when a file it needs cannot be read."""
    config = config if config is not None else saved_config(run) or {}
    trainer = config.get("trainer") or {}
    epochs, step = read_progress(run / "checkpoints" / "last.ckpt")
    max_steps, max_epochs = trainer.get("max_steps") or -1, trainer.get("max_epochs")
    if max_steps > 0 and step >= max_steps:
        return True
    return max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs


# -- what a resume may change --------------------------------------------------------------------------------
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
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, this command's value)`` for every setting outside :data:`MAY_CHANGE` that differs."""
    old, new = flatten(saved), flatten(current)

    def chosen(k: str) -> bool:  # left to the start (null, or a seed of true): matches what the run recorded
        return (k in CHOSEN_WHEN_NULL and new.get(k) is None) or (k == "seed_everything" and new.get(k) is True
                                                                   and is_seed(old.get(k)))

    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if not may_change(k) and not chosen(k) and not same_value(old.get(k), new.get(k))]


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    text = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in changes[:limit])
    return text + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


# -- which checkpoint a command means ------------------------------------------------------------------------
def _runs_with_last(base: Path) -> list[Path]:
    if not base.is_dir():
        return []
    return sorted((d for d in base.iterdir() if (d / "checkpoints" / "last.ckpt").is_file()),
                  key=lambda d: (_version_number(d) is None, _version_number(d) or 0, d.name))


def _where(base: Path) -> str:
    """An absolute path, saying so when the setting was relative (the run may be under another folder)."""
    base = Path(base)
    return str(base) if base.is_absolute() else f"{base.absolute()} (relative to the working directory {Path.cwd()})"


def find_resumable(base: Path, current: dict[str, Any]) -> Path:
    """The run under ``base`` that ``fit --ckpt_path last`` continues: the one unfinished run whose saved config
    matches ``current``. Raises ValueError (one line, with the candidates) when there is not exactly one; a run whose
    files cannot be read is one of the candidates, named with its damaged file."""
    found = _runs_with_last(base)
    if not found:
        raise ValueError(f"--ckpt_path last found no run with a last.ckpt in {_where(base)}; fix: run from "
                         "the folder that holds the runs (or give an absolute trainer.logger.init_args.save_dir), "
                         "pass --ckpt_path RUN_FOLDER, or leave out --ckpt_path to start a new run")
    open_runs, done, other = [], [], []
    for run in found:
        try:
            saved = saved_config(run)
            changes = changed_settings(saved, current) if saved is not None else []
            why = describe_changes(changes, 2) if changes else None if saved is not None else "no config.yaml"
            if why is None:
                (done if is_finished(run, saved) else open_runs).append(run)
                continue
        except ValueError as err:
            why = str(err)
        other.append(f"{run.name}: {why}")
    if len(open_runs) == 1:
        return open_runs[0]
    if len(open_runs) > 1:
        names = ", ".join(str(r) for r in open_runs)
        raise ValueError(f"--ckpt_path last is ambiguous: {len(open_runs)} unfinished runs with this config ({names}); "
                         "fix: pass --ckpt_path with the run folder to resume")
    if done:
        raise ValueError(f"--ckpt_path last continues unfinished runs only, and the run with this config, {done[-1]}, "
                         f"has finished; fix: to train it longer, pass --ckpt_path {done[-1]} (with a larger "
                         "--trainer.max_epochs or --trainer.max_steps), or leave out --ckpt_path to start a new run")
    raise ValueError(f"--ckpt_path last found no run in {base} with this command's settings ({'; '.join(other[-4:])}); "
                     "fix: repeat the run's settings, pass --ckpt_path RUN_FOLDER (a resume then refuses changed "
                     "settings by name), or leave out --ckpt_path to start a new run")


def newest_last(base: Path) -> Path:
    """For evaluation, ``--ckpt_path last`` is the newest ``last.ckpt`` of any run under ``base``."""
    found = _runs_with_last(base)
    if not found:
        raise ValueError(f"--ckpt_path last found no run with a last.ckpt in {_where(base)}; fix: pass the run's "
                         "recipe or logger name as the fit had it (runs of --config smoke are in runs/smoke), or "
                         "--ckpt_path with a run folder or .ckpt file")
    return max(found, key=lambda d: (d / "checkpoints" / "last.ckpt").stat().st_mtime) / "checkpoints" / "last.ckpt"


def outermost_missing(folder: Path) -> Path | None:
    """The outermost ancestor of ``folder`` (or itself) that does not exist yet: what creating it would add."""
    folder = folder.absolute()
    if folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


def _named(folder: Path, only: tuple[str, ...] | None) -> list[Path]:
    """The folder's entries, those whose names match a pattern of ``only`` when given."""
    # iterdir, not glob: glob misses a link whose target is gone, which a write would still follow
    return [p for p in folder.iterdir() if _matches(p.name, only)]


def _entries(folder: Path, only: tuple[str, ...] | None) -> list[Path]:
    """The folder's entries and everything below them (those matching ``only`` and below, when given)."""
    if only is None:
        return list(folder.rglob("*"))
    found = []
    for top in _named(folder, only):
        found += [top, *(top.rglob("*") if top.is_dir() and not top.is_symlink() else ())]
    return found


def snapshot(folder: Path, only: tuple[str, ...] | None = None) -> dict[Path, int]:
    """What a folder holds (only the entries named in ``only`` and below them, when given), with each entry's
    modification time: what a command found there before it wrote."""
    return {p: p.lstat().st_mtime_ns for p in _entries(folder, only)} if folder.is_dir() else {}


def remove_failed(run: Path, before: dict[Path, int] | None, top: Path | None = None,
                  only: tuple[str, ...] | None = None) -> bool:
    """After a command failed, delete what it wrote, unless it saved a ``last.ckpt`` to resume from: the entries it
    added (``before``: :func:`snapshot` at its start; None: it created the folder), only those named in ``only`` when
    it shares the folder with other files (a logger-less fit's working directory may hold data); a folder it created
    goes too once empty, with its empty parents up to ``top``. Returns whether the folder holds a ``last.ckpt`` to
    resume from."""
    if not run.is_dir() or run.is_symlink():
        return False
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file() and (before is None or before.get(last) != last.lstat().st_mtime_ns):
        return True  # it trained and saved its state: keep everything, its config file included
    if before is None and only is None:
        shutil.rmtree(run, ignore_errors=True)
    else:
        new = [p for p in _entries(run, only) if p not in (before or {}) and p.name != LOCK]
        for p in sorted(new, key=lambda q: len(q.parts), reverse=True):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if run / LOCK not in (before or {}):
            (run / LOCK).unlink(missing_ok=True)
        if before is None and not any(run.iterdir()):
            _remove_dir(run)
    parent = run.absolute().parent
    while (before is None and top is not None and top in (parent, *parent.parents) and parent.is_dir()
           and not any(parent.iterdir()) and _remove_dir(parent)):
        parent = parent.parent
    return last.is_file()


def _remove_dir(folder: Path) -> bool:
    try:  # another command may have just created something there: then the folder is its
        folder.rmdir()
    except OSError:
        return False
    return True

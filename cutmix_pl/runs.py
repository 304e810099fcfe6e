"""Run management: where a run lives, which checkpoint a command means, and what a resume may change.

A *run* is one folder, ``<save_dir>/<name>/version_N``, holding ``config.yaml``, the TensorBoard events and
``checkpoints/`` (one ``last.ckpt``, always the newest state). The rules, all enforced here:

- A new ``fit`` claims the next ``version_N`` with an atomic ``mkdir``, so fits started at the same moment never
  share a folder, and holds a lock on it while it runs, so a second process cannot resume into it at the same time.
- ``fit --ckpt_path last`` resumes the unfinished run of that ``save_dir/name`` whose saved config matches this
  command's (keys in :data:`MAY_CHANGE` aside). None, or several: a one-line error that lists the candidates.
  ``--ckpt_path RUN_FOLDER`` or ``--ckpt_path .../checkpoints/X.ckpt`` names a run outright.
- A resume continues in the run's own folder and may change only the keys of :data:`MAY_CHANGE`; any other changed
  setting is refused in one line that names the keys (never accepted and silently ignored).
- ``validate``/``test``/``predict`` of a checkpoint write into ``<run>/<command>/`` of the checkpoint's run, never
  a new ``version_N``.

Plain functions over paths and dicts; the CLI (``cli.py``) applies them to its parsed config.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CHOSEN_WHEN_NULL", "MAY_CHANGE", "RunLock", "changed_settings", "claim_version", "find_resumable", "flatten",
           "is_finished", "mark_finished", "newest_last", "outermost_missing", "remove_failed", "run_of_checkpoint",
           "same_value", "saved_config"]

# Settings a resume may change: they say how to run or report, not what is trained (or, for max_epochs, how long;
# the learning-rate schedule follows the new end). Everything else must equal the run's saved config.
MAY_CHANGE = (
    "ckpt_path", "config", "__default_config__", "weights_only", "trainer.logger",
    "trainer.max_epochs", "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.limit_val_batches", "trainer.limit_test_batches", "trainer.limit_predict_batches",
    "trainer.check_val_every_n_epoch", "trainer.num_sanity_val_steps",
    "data.data_dir", "data.download", "data.eval_batch_size", "data.num_workers", "data.compile_transform",
    "model.compile", "model.channels_last", "model.tta_flip", "model.log_images", "model.grid_size",
    # filled in from data.num_classes by the CLI's links, so not a setting of its own (and unset before instantiation)
    "model.num_classes", "model.net.init_args.num_classes",
)
# ... and, under trainer.callbacks, a ModelCheckpoint's save_last: which files are kept, not what is trained (the
# recipe dropped it once LastCheckpoint kept last.ckpt; runs started before that resume with the new recipe).
MAY_CHANGE_CALLBACK_ARGS = ("save_last",)
# Settings that null leaves to the machine (cli.py, hardware.py): a run found for a resume matches whatever it chose,
# and the resume keeps that choice.
CHOSEN_WHEN_NULL = ("trainer.precision",)
FINISHED = "FINISHED"  # written into a run folder when its fit ends normally
LOCK = ".lock"


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
    """An exclusive ``flock`` on ``<run>/.lock``, held while a fit writes into the run (released at exit, also
    when the process is killed: the kernel drops the lock with the file descriptor)."""

    def __init__(self, run: Path) -> None:
        self.path = run / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"{self.path.parent} is in use by another running fit (pid {holder}); fix: wait for it "
                             "to end or stop it, or leave out --ckpt_path to start a new run") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def mark_finished(run: Path) -> None:
    (run / FINISHED).write_text("fit ended normally\n")


def is_finished(run: Path) -> bool:
    return (run / FINISHED).is_file()


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


def saved_config(run: Path) -> dict[str, Any] | None:
    """The newest config the run was (re)started with: ``config.yaml`` or the highest ``config.resumeK.yaml``."""
    files = [(0, run / "config.yaml")] if (run / "config.yaml").is_file() else []
    files += [(int(m.group(1)), p) for p in run.glob("config.resume*.yaml")
              if (m := re.fullmatch(r"config\.resume(\d+)\.yaml", p.name))]
    if not files:
        return None
    with open(max(files)[1]) as f:
        return yaml.safe_load(f) or {}


def same_value(a: Any, b: Any) -> bool:
    """Equal, with numbers compared to a relative 1e-9 (a float read back from YAML)."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, this command's value)`` for every setting outside :data:`MAY_CHANGE` that differs."""
    old, new = flatten(saved), flatten(current)
    keys = sorted(set(old) | set(new))
    may = lambda k: (any(k == p or k.startswith(p + ".") for p in MAY_CHANGE)  # noqa: E731
                     or re.fullmatch(rf"trainer\.callbacks\.\d+\.init_args\.({'|'.join(MAY_CHANGE_CALLBACK_ARGS)})", k))
    chosen = lambda k: k in CHOSEN_WHEN_NULL and new.get(k) is None  # noqa: E731
    return [(k, old.get(k), new.get(k)) for k in keys
            if not may(k) and not chosen(k) and not same_value(old.get(k), new.get(k))]


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
    matches ``current``. Raises ValueError (one line, with the candidates) when there is not exactly one."""
    runs = _runs_with_last(base)
    if not runs:
        raise ValueError(f"--ckpt_path last found no run with a last.ckpt in {_where(base)}; fix: run from "
                         "the folder that holds the runs (or give an absolute trainer.logger.init_args.save_dir), "
                         "pass --ckpt_path RUN_FOLDER, or leave out --ckpt_path to start a new run")
    matching, other = [], []
    for run in runs:
        saved = saved_config(run)
        changes = changed_settings(saved, current) if saved is not None else [("config.yaml", "missing", None)]
        (matching if not changes else other).append((run, changes))
    open_runs = [r for r, _ in matching if not is_finished(r)]
    if len(open_runs) == 1:
        return open_runs[0]
    if len(open_runs) > 1:
        names = ", ".join(str(r) for r in open_runs)
        raise ValueError(f"--ckpt_path last is ambiguous: {len(open_runs)} unfinished runs with this config ({names}); "
                         "fix: pass --ckpt_path with the run folder to resume")
    if matching:
        done = matching[-1][0]
        raise ValueError(f"--ckpt_path last continues unfinished runs only, and the run with this config, {done}, "
                         f"has finished; fix: to train it longer, pass --ckpt_path {done} (with the larger "
                         "--trainer.max_epochs), or leave out --ckpt_path to start a new run")
    listed = "; ".join(f"{r.name}: {describe_changes(c, 2)}" for r, c in other[-4:])
    raise ValueError(f"--ckpt_path last found no run in {base} with this command's settings ({listed}); fix: "
                     "repeat the run's settings, pass --ckpt_path RUN_FOLDER (a resume then refuses changed "
                     "settings by name), or leave out --ckpt_path to start a new run")


def newest_last(base: Path) -> Path:
    """For evaluation, ``--ckpt_path last`` is the newest ``last.ckpt`` of any run under ``base``."""
    runs = _runs_with_last(base)
    if not runs:
        raise ValueError(f"--ckpt_path last found no last.ckpt in {_where(base)}/*/checkpoints; fix: pass "
                         "--ckpt_path PATH to a .ckpt file or run folder, or the logger name/save_dir of the run")
    return max(runs, key=lambda d: (d / "checkpoints" / "last.ckpt").stat().st_mtime) / "checkpoints" / "last.ckpt"


def outermost_missing(folder: Path) -> Path | None:
    """The outermost ancestor of ``folder`` (or itself) that does not exist yet: what creating it would add."""
    folder = folder.absolute()
    if folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


def remove_failed(run: Path, before: set[Path] | None, top: Path | None = None) -> None:
    """After a command failed before it saved a checkpoint, delete what it wrote: the run folder when this command
    created it (``before`` is None), with the empty parents up to ``top``; else the files it added there."""
    if not run.exists():
        return
    new = [p for p in run.rglob("*") if (before is None or p not in before) and p.name != LOCK]
    if any(p.suffix == ".ckpt" for p in new):
        return  # it trained and saved: keep everything
    if before is None:
        shutil.rmtree(run, ignore_errors=True)
        parent = run.absolute().parent
        while top is not None and top in (parent, *parent.parents) and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
        return
    for p in sorted(new, key=lambda q: len(q.parts), reverse=True):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

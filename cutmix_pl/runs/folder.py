"""Act: claim the folder a command writes into, lock it, point the logger there, and clean up after a failure.

A new fit claims the next ``version_N`` with an atomic ``mkdir``; every command holds an exclusive ``flock`` on
``<folder>/.lock`` while it writes there (the kernel drops it when the process dies, however it dies). A failed
command removes what it wrote, unless it saved a ``last.ckpt`` to resume from.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import shutil
import warnings
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from ..files import atomic_write
from .console import shown

if TYPE_CHECKING:
    from .rules import Decision

LOCK = ".lock"
# What a fit writes into its folder itself; without a logger, whose folder may hold anything, all it may touch there
FIT_FILES = ("config.yaml", "config.resume*.yaml", "checkpoints", LOCK)
# Set by rank 0 for the processes Lightning launches for DDP, which parse the same command again: they write into
# rank 0's run folder rather than claim one of their own.
RUN_ENV = "CUTMIX_PL_RUN"


class Claim:
    """The folder one command writes into, locked, with what it held before (to undo a failure)."""

    def __init__(self, folder: Path, created: bool, only: tuple[str, ...] | None, top: Path | None) -> None:
        self.folder, self.only, self.top = folder, only, top
        lock_added = not os.path.lexists(folder / LOCK)
        folder.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a planted link named .lock must not make this open (and truncate) a file elsewhere
        self._fd: int | None = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 32).decode(errors="replace").strip() or "?"
            self.release()
            raise ValueError(f"{folder} is in use by another running command (pid {holder}); fix: wait for it to end "
                             "(or stop it), then run this command again") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())
        clear_temporary(folder, only)
        clear_temporary(folder / "checkpoints")
        self.before = None if created else snapshot(folder, only)  # under the lock: no other command writes there
        if self.before is not None and lock_added:  # a failure removes the lock file it added
            self.before.pop(folder / LOCK, None)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def failed(self) -> bool:
        """Remove what the command wrote (rank 0 only); returns whether a last.ckpt to resume from is there."""
        return rank_zero_only.rank == 0 and remove_failed(self.folder, self.before, self.top, self.only)


def act(d: Decision, logger: Namespace | None, base: Path | None, tensorboard: bool) -> Claim | None:
    """Carry out the decision: claim and lock the folder (rank 0), point the logger at it."""
    rank0 = rank_zero_only.rank == 0
    if d.mode in ("resume", "continue unlogged"):  # the fit continues these: their checkpoints are no surprise
        for folder in {*d.resumed_dirs, d.folder.resolve() / "checkpoints"}:
            warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(str(folder))} exists and is "
                                    "not empty")
    if d.mode == "new":
        if rank0:
            return _new_run(logger, base)
        if os.environ.get(RUN_ENV):
            point_logger(logger, Path(os.environ[RUN_ENV]))
        return None
    if logger is not None and d.folder is not None:
        point_logger(logger, d.folder)
        if tensorboard:  # not a new run: no placeholder hp_metric at step 0 hiding the tag's earlier points
            logger.default_hp_metric, logger.purge_step = False, d.purge_step
    if not rank0 or d.mode is None:
        return None
    if d.mode == "unlogged":
        refuse_earlier_run(d.folder, "run it from another folder or pass --trainer.default_root_dir DIR")
    if d.mode.endswith("unlogged"):  # the folder may hold data or code: a fit looks at and removes only its own files
        return _take(d.folder, "the run folder", "pass --trainer.default_root_dir DIR with a writable folder",
                     only=FIT_FILES, top=outermost_missing(d.folder))
    if d.mode == "evaluate":
        return _take(d.folder, "the evaluation folder", "copy the checkpoint into a writable folder and pass that "
                     "path to --ckpt_path")
    # a resume continues in its own folder, wherever save_dir points
    return _take(d.folder, "the run folder", "make it writable, or copy the run folder to a writable place and pass "
                 "the copy to --ckpt_path")


def _new_run(logger: Namespace, base: Path) -> Claim:
    why = blocked(base)
    if why is not None:
        raise ValueError(f"cannot write the run folder {base}: {why}; fix: pass --trainer.logger.init_args.save_dir "
                         "DIR with a writable folder")
    top, version = outermost_missing(base), logger.get("version")
    if version is None:
        run = claim_version(base)
    else:
        run = base / (version if isinstance(version, str) else f"version_{version}")
        refuse_earlier_run(run, "leave out trainer.logger.init_args.version (each run gets a new version_N folder)")
    claim = _take(run, "the run folder", "pass --trainer.logger.init_args.save_dir DIR with a writable folder",
                  True if version is None else None, top=top)
    point_logger(logger, run)
    os.environ[RUN_ENV] = str(run.absolute())
    return claim


def _take(folder: Path, what: str, fix: str, created: bool | None = None, only: tuple[str, ...] | None = None,
          top: Path | None = None) -> Claim:
    """Make ``folder`` this command's: refused when it cannot be written or holds a symbolic link (a write through it
    would land outside the run), then locked and cleared of the temporary files of killed writes."""
    folder = folder.absolute()
    why, links = blocked(folder), symlinks_in(folder, only)
    if why is None and links:
        why, fix = f"{links[0]} is a symbolic link (a command writes only inside its run)", "remove the link"
    if why is not None:
        raise ValueError(f"cannot write {what} {folder}: {why}; fix: {fix}")
    return Claim(folder, not folder.exists() if created is None else created, only, top)


def refuse_earlier_run(folder: Path, fix: str) -> None:
    ckpts = folder / "checkpoints"
    if (ckpts.is_dir() and any(ckpts.glob("*.ckpt"))) or (folder / "config.yaml").is_file():
        raise ValueError(f"{folder.absolute()} already holds an earlier run, which this run would overwrite; fix: "
                         f"{fix}, or continue that run with --ckpt_path {shown(folder)}")


def point_logger(logger: Namespace, folder: Path) -> None:
    """The logger's log_dir made ``folder`` (absolute: the same run from any working directory); a ``version_N``
    folder as the number N, which the progress bar shows as ``v_num=N``."""
    folder = folder.absolute()
    number = folder.name[len("version_"):]
    logger.save_dir, logger.name = str(folder.parent.parent), folder.parent.name
    logger.version = int(number) if folder.name.startswith("version_") and number.isdigit() else folder.name


def claim_version(base: Path) -> Path:
    """Create the next free ``base/version_N``: of two processes racing for one N, mkdir lets one win."""
    base.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for d in base.iterdir() if (m := re.fullmatch(r"version_(\d+)", d.name))]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (base / f"version_{n}").mkdir()
            return base / f"version_{n}"
        except FileExistsError:
            n += 1


def blocked(path: Path) -> str | None:
    """Why ``path`` (a folder, perhaps not there yet) cannot be created and written, or None if it can."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    return None if os.access(probe, os.W_OK | os.X_OK) else f"{probe} is not writable"


def outermost_missing(folder: Path) -> Path | None:
    """The outermost ancestor of ``folder`` (or itself) that does not exist yet: what creating it would add."""
    folder = folder.absolute()
    if folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


def _named(folder: Path, only: tuple[str, ...] | None) -> list[Path]:
    # iterdir, not glob: glob misses a link whose target is gone, which a write would still follow
    return [p for p in folder.iterdir() if only is None or any(fnmatchcase(p.name, o) for o in only)]


def symlinks_in(folder: Path, only: tuple[str, ...] | None = None) -> list[Path]:
    """The folder, its entries (matching ``only``) and its ``checkpoints/`` entries that are symbolic links: a write
    through one would land outside the run."""
    found = [folder] if folder.is_symlink() else []
    if folder.is_dir() and not folder.is_symlink():
        found += [p for p in _named(folder, only) if p.is_symlink()]
        ckpts = folder / "checkpoints"
        if ckpts.is_dir() and not ckpts.is_symlink():
            found += [p for p in ckpts.iterdir() if p.is_symlink()]
    return found


def clear_temporary(folder: Path, only: tuple[str, ...] | None = None) -> None:
    """Remove the temporary files of writes killed half-way (``.NAME.*.tmp``; their targets are intact)."""
    for stale in folder.glob(".*.tmp"):
        name = stale.name[1:].rsplit(".", 2)[0]
        if (only is None or any(fnmatchcase(name, o) for o in only)) and (stale.is_file() or stale.is_symlink()):
            stale.unlink(missing_ok=True)


def _entries(folder: Path, only: tuple[str, ...] | None) -> list[Path]:
    if only is None:
        return list(folder.rglob("*"))
    return [q for top in _named(folder, only)
            for q in (top, *(top.rglob("*") if top.is_dir() and not top.is_symlink() else ()))]


def snapshot(folder: Path, only: tuple[str, ...] | None = None) -> dict[Path, int]:
    """What a folder holds (under ``only``), with modification times: what a command found before it wrote."""
    return {p: p.lstat().st_mtime_ns for p in _entries(folder, only)} if folder.is_dir() else {}


def remove_failed(run: Path, before: dict[Path, int] | None, top: Path | None = None,
                  only: tuple[str, ...] | None = None) -> bool:
    """After a failure, delete what the command added (``before``: its :func:`snapshot`; None: it created the
    folder), with the empty parents it created up to ``top``, unless it saved a last.ckpt. Returns whether the
    folder holds a last.ckpt to resume from."""
    if not run.is_dir() or run.is_symlink():
        return False
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file() and (before is None or before.get(last) != last.lstat().st_mtime_ns):
        return True  # it trained and saved its state: keep everything, its config file included
    if before is None and only is None:
        shutil.rmtree(run, ignore_errors=True)
    else:
        others = {lock.parent for lock in run.glob(f"*/{LOCK}")}  # an evaluation's folder: another command's claim
        new = [p for p in _entries(run, only) if p not in (before or {}) and p.name != LOCK
               and not others.intersection((p, *p.parents))]
        for p in sorted(new, key=lambda q: len(q.parts), reverse=True):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing through :func:`files.atomic_write`: a kill or a full disk never
    leaves a truncated checkpoint (loading is unchanged)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_save(checkpoint, path)


def atomic_save(obj: Any, path: str | Path) -> None:
    data = io.BytesIO()
    torch.save(obj, data)  # serialised in memory first: a full disk then fails a plain write, with its errno
    atomic_write(path, data.getbuffer())

"""Checkpoints written atomically: a temporary file beside the target, flushed to disk, then renamed over it.

Lightning's own writer stages the bytes in a temporary file in ``$TMPDIR`` and then moves it onto the target; when
the run folder is on another filesystem (node-local ``/tmp``, shared output disk: the usual cluster layout) that move
is a copy into the target, and a kill or a full disk during it leaves a truncated ``last.ckpt`` that cannot resume.
Here the target is replaced only by a complete file: the temporary file (a unique name) lies beside it, so the rename
stays within one folder and is atomic on any filesystem. A failed write removes its temporary file and ends in one line.
"""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "atomic_save", "atomic_write"]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the file, the cause and the fix."""


def atomic_write(path: str | Path, data: bytes | memoryview, what: str = "the checkpoint") -> None:
    """Write ``data`` to ``path`` so that ``path`` is either its old self or the complete new file, never a part.

    The temporary file is created beside the target with a unique name, and a target that is a symbolic link is
    replaced, not written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        why = err.strerror or type(err).__name__
        raise CheckpointWriteError(f"could not write {what} {path} ({why}); nothing was left half-written; fix: free space "
                                   "or choose another trainer.logger.init_args.save_dir, then resume with "
                                   "--ckpt_path last") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (a crash right after it must not bring the old file back)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the file itself is complete


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new file ``.NAME.<random>.tmp`` beside ``path``, opened with O_EXCL (a planted file or link of that name is
    never opened) and the permissions a new file gets here (0666 less the umask): not mkstemp's 0600, so that those
    who may read the run's other files may read its checkpoints too (a shared cluster disk)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through :func:`atomic_write`."""
    data = io.BytesIO()
    torch.save(obj, data)  # serialised in memory first: a full disk then fails a plain write, with its errno
    atomic_write(path, data.getbuffer())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with :func:`atomic_save` for writing (loading is unchanged)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_save(checkpoint, path)

"""Files written atomically: a temporary file beside the target, flushed to disk, then renamed over it.

Used for everything this project writes that a later start reads back (checkpoints, configs, caches, predictions):
the target is either its old self or the complete new file, never a part, whatever kills the write. The temporary
file lies beside the target, so the rename stays within one filesystem (Lightning's own writer stages in $TMPDIR and
then copies across filesystems, which a kill truncates).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["WriteError", "atomic_write"]


class WriteError(OSError):
    """A file could not be written; the message names the file, the cause and the fix."""


def atomic_write(path: str | Path, data: bytes | memoryview | Callable[[BinaryIO], object],
                 what: str = "the checkpoint",
                 fix: str = "free space or choose another trainer.logger.init_args.save_dir, then resume with "
                            "--ckpt_path last") -> None:
    """Write ``data`` to ``path`` atomically; a target that is a symbolic link is replaced, not written through.

    ``data`` is the bytes, or a function that writes them to the open file (streamed: a large image cache is never
    held twice in memory)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_beside(path)
    except OSError as err:
        raise WriteError(f"could not write {what} {path} ({err.strerror or type(err).__name__}); fix: {fix}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write {what} {path} ({err.strerror or type(err).__name__}); nothing was left "
                         f"half-written; fix: {fix}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself made durable: a crash right after it must not bring the old file back
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the file itself is complete


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new ``.NAME.<random>.tmp`` beside ``path``: O_EXCL, so a planted file or link of that name is never opened;
    0666 less the umask (not mkstemp's 0600), so those who may read the run's files may read this one too."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")

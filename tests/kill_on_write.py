"""Kill the process (SIGKILL) while it writes a checkpoint file: for tests of what a kill mid-save leaves behind.

``install(n)`` patches ``open`` and ``os.fdopen`` (the atomic writer's temporary file) so that the n-th file opened for
writing with "ckpt" (or ``part``) in its name takes half of what is written to it, then the process dies; a file filled by sendfile (shutil's copy across filesystems, as Lightning's
writer moves its staged file) dies before any byte. Subprocess scripts import it from the tests folder.
"""

from __future__ import annotations

import builtins
import os
import signal
from pathlib import Path
from typing import Any

_real_open = builtins.open
_real_fdopen = os.fdopen


class HalfThenKill:
    def __init__(self, f: Any) -> None:
        self.f = f

    def write(self, data: Any) -> None:
        data = bytes(data)
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def fileno(self) -> int:  # asked for by sendfile before it writes
        os.kill(os.getpid(), signal.SIGKILL)
        return -1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> HalfThenKill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def install(nth: int = 1, note: Path | None = None, part: str = "ckpt") -> None:
    """Die inside the ``nth`` file opened for writing whose name holds ``part``; write its name to ``note`` first."""
    count = [0]

    def killing_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = _real_open(file, mode, *args, **kwargs)
        return watch(f, str(file)) if "w" in mode else f

    def killing_fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        f = _real_fdopen(fd, mode, *args, **kwargs)
        return watch(f, name) if "w" in mode else f

    def watch(f: Any, name: str) -> Any:
        if part in name:
            count[0] += 1
            if count[0] == nth:
                if note is not None:
                    note.write_text(name)
                return HalfThenKill(f)
        return f

    builtins.open = killing_open
    os.fdopen = killing_fdopen

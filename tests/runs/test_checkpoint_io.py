"""Atomic checkpoint writes: a kill half-way through a save, or a full disk, never leaves a truncated checkpoint.

Where the tests run as root and may mount, the checkpoint folder is a tmpfs of its own (another filesystem than the
temporary folder, as a shared output disk is on a cluster); elsewhere it is an ordinary folder.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cutmix_pl.files import WriteError as CheckpointWriteError
from cutmix_pl.runs.folder import AtomicCheckpointIO, atomic_save


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def other_fs(tmp_path: Path):
    """A folder on a tmpfs of its own when possible (yields the folder and whether it is one)."""
    folder = tmp_path / "shared_disk"
    mounted = _mount_tmpfs(folder, "64m")
    yield folder, mounted
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)


# Saves a checkpoint with the writer named in argv[2], the process killed (SIGKILL) while it writes the checkpoint's
# bytes to disk (tests/kill_on_write.py). Lightning's writer stages
# the bytes in $TMPDIR and then moves them; across filesystems that move is a copy into the target, which the kill
# truncates.
KILL_HALF_WAY = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from cutmix_pl.runs.folder import AtomicCheckpointIO
    import kill_on_write

    kill_on_write.install(1)
    writer = {"atomic": AtomicCheckpointIO, "lightning": TorchCheckpointIO}[sys.argv[2]]()
    writer.save_checkpoint({"step": 2, "w": torch.ones(50_000)}, sys.argv[1])
""")


def kill_during_save(path: Path, writer: str) -> int:
    tests = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", KILL_HALF_WAY, str(path), writer, tests], capture_output=True,
                          timeout=120)
    return proc.returncode


@pytest.mark.parametrize("writer", ["atomic", "lightning"])
def test_kill_half_way_through_a_save(writer, other_fs):
    folder, mounted = other_fs
    if writer == "lightning" and not mounted:
        pytest.skip("Lightning's writer moves its staged file with a rename on one filesystem: needs a tmpfs mount")
    path = folder / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.zeros(50_000)}, path)
    assert kill_during_save(path, writer) == -signal.SIGKILL
    if writer == "lightning":  # the failure this guards against: Lightning's writer leaves a truncated file
        with pytest.raises(Exception):
            torch.load(path, weights_only=True)
        return
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.zeros(50_000)), "the old checkpoint is intact"
    # the killed save's partial temporary file is beside it, never under the checkpoint's name
    others = [p.name for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert len(others) == 1 and others[0].startswith(".last.ckpt.") and others[0].endswith(".tmp"), others


def test_a_full_disk_is_one_line_and_leaves_nothing(other_fs, monkeypatch):
    folder, mounted = other_fs
    path = folder / "best.ckpt"
    if mounted:  # a real full disk: fill the tmpfs, leaving less room than the checkpoint needs
        with open(folder / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        os.truncate(folder / "filler", os.path.getsize(folder / "filler") - 100_000)
    else:  # simulated: the temporary file takes 1000 bytes, then the disk is full
        real_fdopen = os.fdopen

        class Full(io.RawIOBase):
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(bytes(data[:1000]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def close(self):
                self.f.close()

        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    with pytest.raises(CheckpointWriteError) as err:
        atomic_save({"w": torch.zeros(1_000_000)}, path)
    msg = str(err.value)
    assert str(path) in msg and "No space left on device" in msg and "fix:" in msg and "\n" not in msg
    assert not path.exists() and not list(folder.glob(".*.tmp")), "no unloadable file is left behind"


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_a_checkpoint_gets_the_permissions_of_any_new_file(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        atomic_save({"w": torch.zeros(3)}, tmp_path / "last.ckpt")
    finally:
        os.umask(before)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == mode


def test_atomic_writer_round_trips_like_lightnings(tmp_path):
    state = {"state_dict": {"w": torch.arange(10.0)}, "global_step": 7}
    AtomicCheckpointIO().save_checkpoint(state, tmp_path / "a.ckpt")
    TorchCheckpointIO().save_checkpoint(state, tmp_path / "b.ckpt")
    a, b = (torch.load(tmp_path / n, weights_only=True) for n in ("a.ckpt", "b.ckpt"))
    assert a["global_step"] == b["global_step"] == 7 and torch.equal(a["state_dict"]["w"], b["state_dict"]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "b.ckpt"]

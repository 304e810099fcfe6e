"""Whether a dataset fits where the resident design keeps it, asked before anything is read.

The DataModule holds every split as uint8 on the training device (``loaders.py``) and, while it loads them, on the
host as well (a split is gathered out of the training set, so the host briefly holds two copies). A dataset that
cannot fit is refused in one line that names its size, the room there and the fix, instead of an out-of-memory
error minutes later.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["available_bytes", "check_fits", "gib"]

HOST_COPIES = 2  # the images as read, and the splits gathered from them


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: the kernel's MemAvailable); None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(nbytes: int, device: torch.device, what: str, image_size: tuple[int, int] | None) -> None:
    """ValueError (one line) when ``nbytes`` of uint8 images cannot be held on ``device`` and on the host."""
    side = f"{image_size[0]}x{image_size[1]}" if image_size else "their size"
    fix = ("fix: a smaller --data.image_size (the bytes scale with its square; half the side is a quarter of the "
           "bytes), fewer images, or a device with more memory; beyond that size the resident design stops: see "
           "docs/design.md, 'Datasets'")
    places = [(torch.device("cpu"), HOST_COPIES * nbytes, "the host (a second copy while the splits are made)")]
    if device.type != "cpu":
        places.append((device, nbytes, str(device)))
    for where, need, name in places:
        free = available_bytes(where)
        if free is not None and need > free:
            raise ValueError(f"{what} takes {gib(nbytes)} as uint8 at {side} and must be held on {name}: "
                             f"{gib(need)} needed, {gib(free)} free; {fix}")

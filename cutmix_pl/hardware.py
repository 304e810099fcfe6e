"""The fastest setting measured safe on the machine a run starts on: precision and memory format.

Settings left as ``null`` (``trainer.precision``, ``model.channels_last``) are chosen here, once, at start:

- a GPU: bf16 autocast (``bf16-mixed``) and channels-last, the fast GPU recipe's settings;
- a CPU with AVX-512: fp32 and channels-last, 1.27x fp32 NCHW on the 2-core AMD EPYC (the same sums in another
  order). bf16 autocast is faster still on CPUs with bf16 instructions (2.1x there) but trained to 0.15 to 0.71
  points lower accuracy than fp32 at 15 epochs (three runs), so it is not chosen for the user; the start-up line
  names it where the CPU has them (docs/speed.md, "CPU precision and memory format");
- any other CPU (AVX2 only, ARM, unknown): fp32 NCHW, unmeasured, so unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = ["Choice", "choose", "cpu_flags"]

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names, as Linux prints them


class Choice(NamedTuple):
    precision: str
    channels_last: bool
    why: str
    hint: str = ""  # a faster setting not chosen, with its cost


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's instruction-set flags as Linux reports them; empty where there is no such file."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def uses_cuda(accelerator: Any, cuda_available: bool) -> bool:
    """Whether Lightning will run on a CUDA GPU for this ``trainer.accelerator``."""
    return cuda_available and str(accelerator) in ("auto", "gpu", "cuda")


def choose(accelerator: Any, cuda_available: bool | None = None, flags: frozenset[str] | None = None) -> Choice:
    """The precision and memory format for a run on ``accelerator`` ("auto", "cpu", "gpu", ...)."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if uses_cuda(accelerator, cuda):
        return Choice("bf16-mixed", True, "a CUDA GPU")
    if str(accelerator) not in ("auto", "cpu"):  # MPS, TPU, ...: not measured here, so Lightning's defaults
        return Choice("32-true", False, f"accelerator {accelerator!s}, not measured")
    flags = cpu_flags() if flags is None else flags
    bf16 = sorted(f.upper() for f in BF16_FLAGS if f in flags)
    hint = (f"--trainer.precision bf16-mixed trains about 2x faster on this CPU ({'/'.join(bf16)}) at 0.15 to 0.71 "
            "points lower accuracy (15 epochs, docs/speed.md)") if bf16 else ""
    if "avx512f" in flags or bf16:
        return Choice("32-true", True, "a CPU with AVX-512", hint)
    return Choice("32-true", False, "a CPU without AVX-512 (not measured: full precision, NCHW)")

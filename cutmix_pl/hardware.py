"""The fastest setting measured safe on the machine a run starts on: precision and memory format.

Settings left as ``null`` (``trainer.precision``, ``model.channels_last``) are chosen here, once, at start:

- a GPU: bf16 autocast (``bf16-mixed``) and channels-last, the fast GPU recipe's settings;
- a CPU with AVX-512: fp32 and channels-last, 1.27x fp32 NCHW on the 2-core AMD EPYC (AVX512-BF16; the same sums
  in another order). bf16 autocast is faster still on CPUs with bf16 instructions (2.1x there) but trained to 0.15
  to 0.71 points lower accuracy than fp32 at 15 epochs (three runs), so it is not chosen for the user; the start-up
  line names it where the CPU has them (docs/speed.md, "CPU precision and memory format");
- an x86 CPU with AVX2 but no AVX-512: fp32 and channels-last, as measured on the 2-core AMD EPYC with its kernels
  limited to AVX2 (a ResNet-20 training step at batch 128: 465 img/s channels-last against 398 NCHW). Without bf16 instructions bf16
  is emulated there, 31 img/s, about 15x slower than fp32: never hinted, and warned about where it is asked for
  (``bf16_warning``);
- any other CPU (ARM, x86 without AVX2, unknown: no /proc/cpuinfo): fp32 NCHW, not measured, so unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = ["Choice", "bf16_warning", "choose", "cpu_flags", "native_bf16"]

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names, as Linux prints them
X86_FLAGS = ("sse2", "avx", "avx2", "avx512f")  # any of them: an x86 CPU (ARM prints "Features" of other names)
# A CPU with AVX2 only, bf16 emulated: a ResNet-20 training step at batch 128 in img/s (docs/speed.md)
AVX2_STEP = {"cpu": "a 2-core AMD EPYC limited to AVX2", "fp32 nchw": 398, "fp32 channels-last": 465, "bf16": 31}


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


def native_bf16(flags: frozenset[str]) -> list[str]:
    """The CPU's bf16 instructions, as the start-up lines name them (``AMX_BF16``, ``AVX512_BF16``)."""
    return sorted(f.upper() for f in BF16_FLAGS if f in flags)


def runs_on_cpu(accelerator: Any, cuda_available: bool) -> bool:
    """Whether Lightning will run on the CPU for this ``trainer.accelerator`` ("cpu", or "auto" without CUDA)."""
    return str(accelerator) in ("auto", "cpu") and not uses_cuda(accelerator, cuda_available)


def choose(accelerator: Any, cuda_available: bool | None = None, flags: frozenset[str] | None = None) -> Choice:
    """The precision and memory format for a run on ``accelerator`` ("auto", "cpu", "gpu", ...)."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if uses_cuda(accelerator, cuda):
        return Choice("bf16-mixed", True, "a CUDA GPU")
    if not runs_on_cpu(accelerator, cuda):  # MPS, TPU, ...: not measured here, so Lightning's defaults
        return Choice("32-true", False, f"accelerator {accelerator!s}, not measured")
    flags = cpu_flags() if flags is None else flags
    bf16 = native_bf16(flags)
    hint = (f"--trainer.precision bf16-mixed trains about 2x faster on this CPU ({'/'.join(bf16)}) at 0.15 to 0.71 "
            "points lower accuracy (15 epochs, docs/speed.md)") if bf16 else ""
    if "avx512f" in flags or bf16:
        return Choice("32-true", True, "a CPU with AVX-512", hint)
    if "avx2" in flags:
        speedup = AVX2_STEP["fp32 channels-last"] / AVX2_STEP["fp32 nchw"]
        return Choice("32-true", True, f"a CPU with AVX2 and no AVX-512: channels-last {speedup:.2f}x NCHW on "
                      f"{AVX2_STEP['cpu']}")
    return Choice("32-true", False, "a CPU without AVX2 or AVX-512 (not measured: full precision, NCHW)")


def bf16_warning(precision: Any, accelerator: Any, cuda_available: bool | None = None,
                 flags: frozenset[str] | None = None) -> str | None:
    """One line where ``trainer.precision`` is a bf16 setting (``bf16-mixed``, ``bf16``, ``bf16-true``) for a CPU run
    on an x86 CPU without bf16 instructions, where bf16 is emulated; None otherwise (a GPU run, a CPU with
    AVX512_BF16 or AMX_BF16, or one not known to be x86: ARM, no /proc/cpuinfo; not measured there)."""
    if not str(precision).startswith("bf16"):
        return None
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not runs_on_cpu(accelerator, cuda):
        return None
    flags = cpu_flags() if flags is None else flags
    if native_bf16(flags) or not any(f in flags for f in X86_FLAGS):
        return None
    bf16, fp32, cpu = AVX2_STEP["bf16"], AVX2_STEP["fp32 channels-last"], AVX2_STEP["cpu"]
    return (f"trainer.precision={precision} on a CPU without bf16 instructions (no AVX512_BF16 or AMX_BF16): bf16 "
            f"is emulated, about {round(fp32 / bf16)}x slower than fp32 ({bf16} against {fp32} img/s in fp32 "
            f"channels-last, a ResNet-20 training step at batch 128 on {cpu}); fix: --trainer.precision 32-true, or "
            "leave it null (the fastest measured safe here)")

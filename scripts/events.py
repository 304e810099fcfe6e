"""A run's TensorBoard event files, as the scripts read them: scalar series, the training time, a curve plot.

A run folder holds one event file per process start of its fit (a resumed fit adds one); ``<run>/test/`` one per
``test`` of its checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

Series = dict[str, list[tuple[int, float, float]]]  # tag -> [(step, value, wall time)]


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("events.out.tfevents.*"))


def scalars(path: Path) -> Series:
    """Every scalar of one event file."""
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
    return {t: [(e.step, e.value, e.wall_time) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def read_run(folder: Path) -> tuple[Series, float | None]:
    """The scalar series of a fit's run folder (its event files joined in order) and the seconds it trained: the
    span of each file summed, so that the pause between an interrupted fit and its resume does not count. None
    without event files."""
    series: Series = {}
    spans = []
    for path in files(folder):
        part = scalars(path)
        for tag, points in part.items():
            series.setdefault(tag, []).extend(points)
        walls = [w for points in part.values() for _, _, w in points]
        spans.append(max(walls) - min(walls) if walls else 0.0)
    return series, (sum(spans) if spans else None)


def points(series: Series, tag: str = "val/acc") -> list[tuple[int, float, float]]:
    """A tag's (step, value, wall time) in step order, one per step: where a resumed fit logged a step again, its
    later point."""
    return sorted({step: (step, value, wall) for step, value, wall in series.get(tag, [])}.values())


def curve(series: Series, tag: str = "val/acc") -> list[float]:
    """A tag's values in step order, one per step (see :func:`points`)."""
    return [value for _, value, _ in points(series, tag)]


def plot(curves: dict[str, list[float]], path: Path | BinaryIO, title: str, styles: dict[str, dict] | None = None,
         x: Sequence[float | str] | None = None, xlabel: str = "epoch",
         ylabel: str = "validation accuracy (%)") -> bool:
    """Validation accuracy per epoch, one line per entry; False (and nothing written) without matplotlib.

    Other curves of fractions (drawn in %) take ``x``, the positions every line shares (numbers, or category names),
    instead of the epochs 1, 2, ..., and their axis labels. ``path``: a file, or a binary file object for the PNG."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1) if x is None else list(x), [100 * v for v in values],
                marker="o" if len(values) <= 30 else None, ms=3, label=label, **(styles or {}).get(label, {}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, **({} if isinstance(path, (str, Path)) else {"format": "png"}))
    plt.close(fig)
    return True

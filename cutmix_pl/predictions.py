"""What ``predict`` computes, written to ``predictions.csv`` in the command's log folder."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from .files import atomic_write
from .splits import PREDICT_FROM

__all__ = ["PredictionWriter"]


class PredictionWriter(Callback):
    """Writes ``predict``'s output to ``<log_dir>/predictions.csv`` and prints the path.

    One row per image: ``index`` (its position in the predicted split), ``file`` (the image file under the data
    folder, for a dataset read from files), ``label`` (the true class, empty when unknown), ``pred`` (the predicted
    class) and one probability column per class. Under DDP every rank writes its shard to a part file; rank 0 joins
    them in index order.

    Args:
        filename: the file's name inside the log folder.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        self.filename = filename
        self._rows: list[dict[str, torch.Tensor]] = []
        self._written: Path | None = None

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(outputs, dict) and "prob" in outputs:
            self._rows.append({k: v.detach().cpu() for k, v in outputs.items() if isinstance(v, torch.Tensor)})

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self._folder(trainer)
        target = folder / self.filename
        reader = getattr(trainer.datamodule, "reader", None)
        files = reader.files(PREDICT_FROM) if reader is not None else None
        classes = getattr(trainer.datamodule, "classes", None)
        if trainer.world_size == 1:
            self._write(target, self._rows, classes, files)
        else:
            part = folder / f".{self.filename}.part{trainer.global_rank}"
            self._write(part, self._rows, classes, files)
            trainer.strategy.barrier("predictions")
            if trainer.is_global_zero:
                self._join([folder / f".{self.filename}.part{r}" for r in range(trainer.world_size)], target)
            trainer.strategy.barrier("predictions-joined")
        self._rows, self._written = [], target if trainer.is_global_zero else None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # said once the progress bar has closed its line (at the loop's end), not glued to its end
        if self._written is not None:
            print(f"cutmix-pl: wrote the predictions to {self._written}", file=sys.stderr)
            self._written = None

    @staticmethod
    def _write(path: Path, rows: list[dict[str, torch.Tensor]], classes: Any, files: list[str] | None) -> None:
        k = rows[0]["prob"].shape[1] if rows else 0
        names = list(classes) if classes is not None and len(classes) == k else [str(i) for i in range(k)]
        text = io.StringIO(newline="")
        out = csv.writer(text)
        file_column = ["file"] if files is not None else []
        out.writerow(["index", *file_column, "label", "pred", *(f"prob_{n}" for n in names)])
        for part in rows:
            n = len(part["prob"])
            index = part.get("index", torch.full((n,), -1)).tolist()
            label = part["label"].tolist() if "label" in part else [""] * n
            for i, y, p, probs in zip(index, label, part["pred"].tolist(), part["prob"].tolist()):
                file = [files[i] if 0 <= i < len(files) else ""] if files is not None else []
                out.writerow([i, *file, y, p, *(f"{q:.6g}" for q in probs)])
        atomic_write(path, text.getvalue().encode(), "the predictions")

    @staticmethod
    def _join(parts: list[Path], target: Path) -> None:
        header, rows = None, []
        for part in parts:
            with open(part, newline="") as f:
                reader = csv.reader(f)
                header = next(reader)
                rows.extend(reader)
            part.unlink()
        rows.sort(key=lambda r: int(r[0]))
        text = io.StringIO(newline="")
        out = csv.writer(text)
        out.writerow(header or [])
        out.writerows(rows)
        atomic_write(target, text.getvalue().encode(), "the predictions")

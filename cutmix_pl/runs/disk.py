"""Read: what the disk holds about the runs a command names, read once into plain values. Nothing here decides.

A *run* is one folder, ``<save_dir>/<name>/version_N``, holding ``config.yaml`` (and a ``config.resumeK.yaml`` per
resume), the TensorBoard events and ``checkpoints/`` with one ``last.ckpt``, always the newest state. What a run is
comes from those files alone: no marker file that a failed command could leave behind or take away.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = ["RunOnDisk", "Seen", "read", "read_progress", "run_of_checkpoint", "saved_config", "survey"]


@dataclass
class RunOnDisk:
    """One run folder with a last.ckpt, as read: its newest config and last.ckpt, or why each cannot be read."""

    folder: Path
    config: dict[str, Any] | None = None
    config_error: str | None = None
    checkpoint: dict[str, Any] | None = None
    progress: tuple[int, int] | None = None  # (epochs done, global step)
    checkpoint_error: str | None = None


@dataclass
class Seen:
    """What one command's ``--ckpt_path`` names on disk."""

    ckpt: str | None = None  # the checkpoint file (None: --ckpt_path last of a fit, which the rules pick)
    checkpoint: dict[str, Any] | None = None
    run: Path | None = None  # the checkpoint's run folder
    run_config: dict[str, Any] | None = None  # the run's newest config (fit only)
    newest: bool = False  # ``last`` of an evaluation: the newest run's last.ckpt
    data_dir: str | None = None  # an evaluation's: the data folder the checkpoint's run read, when it is there
    candidates: list[RunOnDisk] = field(default_factory=list)  # ``last`` of a fit: every run with a last.ckpt


def read(sub: str, ckpt: str | None, base: Path | None, weights_only: bool | None) -> Seen:
    """Read what ``--ckpt_path`` names (``base``: the logger's ``<save_dir>/<name>``, None without a logger).
    A name that cannot be read ends here, in one line."""
    if ckpt is None or "://" in ckpt:
        return Seen(ckpt)
    if ckpt == "hpc":  # Lightning would load it unchecked, and into a new run folder
        raise ValueError("--ckpt_path hpc names Lightning's SLURM requeue checkpoint (hpc_ckpt_N.ckpt in "
                         "trainer.default_root_dir), which this project's runs do not write: a stop saves last.ckpt "
                         "in the run folder; fix: pass --ckpt_path last, the run folder, or an hpc_ckpt_N.ckpt file")
    if ckpt == "best":  # Lightning's name for the best model of a fit in the same Python process
        raise ValueError("--ckpt_path best names the best checkpoint of a fit run in the same Python process, which a "
                         "command of its own does not have; fix: pass the run's checkpoints/best-epochNNN.ckpt, a run "
                         "folder (runs/<name>/version_N), or last")
    if ckpt == "last" and base is None:
        raise ValueError("--ckpt_path last needs a logger with a save_dir (the run folders live there); fix: pass "
                         "--ckpt_path PATH to a .ckpt file or run folder")
    if ckpt == "last" and sub == "fit":
        found = survey(base)
        if not found:
            raise ValueError(f"--ckpt_path last found no run with a last.ckpt in {_where(base)}; fix: run from the "
                             "folder that holds the runs (or give an absolute trainer.logger.init_args.save_dir), "
                             "pass --ckpt_path RUN_FOLDER, or leave out --ckpt_path to start a new run")
        return Seen(candidates=found)
    path = newest_last(base) if ckpt == "last" else _checkpoint_file(ckpt)
    seen = Seen(str(path), read_checkpoint(path, weights_only), run_of_checkpoint(path), newest=ckpt == "last")
    data = seen.checkpoint.get("datamodule_hyper_parameters") if isinstance(seen.checkpoint, dict) else None
    where = data.get("data_dir") if isinstance(data, dict) else None
    if sub != "fit" and isinstance(where, str) and Path(where).is_dir():
        seen.data_dir = where
    if sub == "fit":
        try:
            seen.run_config = saved_config(seen.run)
        except ValueError as err:
            raise ValueError(f"{err}; fix: repair that file, or move it away (the run's previous config file then "
                             "counts)") from None
    return seen


def run_of_checkpoint(ckpt: str | Path) -> Path:
    """The run folder of a checkpoint: the parent of ``checkpoints/``, else the file's own folder."""
    parent = Path(ckpt).absolute().parent
    return parent.parent if parent.name == "checkpoints" else parent


def version_number(folder: Path) -> int | None:
    m = re.fullmatch(r"version_(\d+)", folder.name)
    return int(m.group(1)) if m else None


def saved_config(run: Path) -> dict[str, Any] | None:
    """The newest config the run was (re)started with: ``config.yaml`` or the highest ``config.resumeK.yaml``.
    Raises ValueError, naming the file, when it cannot be read."""
    files = [(0, run / "config.yaml")] if (run / "config.yaml").is_file() else []
    # an empty resume config is a resume killed as it began, by a version that wrote it in place: not a config
    files += [(int(m.group(1)), p) for p in run.glob("config.resume*.yaml")
              if (m := re.fullmatch(r"config\.resume(\d+)\.yaml", p.name)) and p.stat().st_size > 0]
    if not files:
        return None
    path = max(files)[1]
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds no config")
    return config


def _progress_of(ckpt: Path) -> tuple[dict[str, Any], tuple[int, int]]:
    """A checkpoint read without its tensors' data (memory-mapped), and the (epochs done, global step) it holds."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        epochs = state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
        return state, (int(epochs), int(state["global_step"]))
    except Exception as err:  # truncated zip, not a Lightning checkpoint, a global a weights-only load refuses, ...
        raise ValueError(f"{ckpt} cannot be read ({type(err).__name__})") from None


def read_progress(ckpt: Path) -> tuple[int, int]:
    """(epochs done, global step) of a checkpoint; ValueError when it cannot be read."""
    return _progress_of(ckpt)[1]


def _runs_with_last(base: Path) -> list[Path]:
    if not base.is_dir():
        return []
    return sorted((d for d in base.iterdir() if (d / "checkpoints" / "last.ckpt").is_file()),
                  key=lambda d: (version_number(d) is None, version_number(d) or 0, d.name))


def survey(base: Path) -> list[RunOnDisk]:
    """Every run under ``base`` with a last.ckpt, each read (a damaged file is recorded, not raised)."""
    found = []
    for folder in _runs_with_last(base):
        run = RunOnDisk(folder)
        try:
            run.config = saved_config(folder)
        except ValueError as err:
            run.config_error = str(err)
        try:
            run.checkpoint, run.progress = _progress_of(folder / "checkpoints" / "last.ckpt")
        except ValueError as err:
            run.checkpoint_error = str(err)
        found.append(run)
    return found


def _where(base: Path) -> str:
    """An absolute path, saying so when the setting was relative (the run may be under another folder)."""
    return str(base) if base.is_absolute() else f"{base.absolute()} (relative to the working directory {Path.cwd()})"


def newest_last(base: Path) -> Path:
    found = _runs_with_last(base)
    if not found:
        raise ValueError(f"--ckpt_path last found no run with a last.ckpt in {_where(base)}; fix: pass the run's "
                         "recipe or logger name as the fit had it (runs of --config smoke are in runs/smoke), or "
                         "--ckpt_path with a run folder or .ckpt file")
    return max(found, key=lambda d: (d / "checkpoints" / "last.ckpt").stat().st_mtime) / "checkpoints" / "last.ckpt"


def _checkpoint_file(ckpt: str) -> Path:
    path = Path(ckpt)
    if path.is_dir():  # a run folder
        path = path / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ValueError(f"--ckpt_path {ckpt} is a folder without checkpoints/last.ckpt (no run, or one that "
                             "saved nothing); fix: pass the folder of a run that saved a checkpoint, a .ckpt file, or "
                             "--ckpt_path last")
    elif not path.is_file():
        raise ValueError(f"--ckpt_path {ckpt} does not exist; fix: pass the path of a .ckpt file (e.g. "
                         "runs/<name>/version_N/checkpoints/last.ckpt), a run folder, or --ckpt_path last")
    return path


def read_checkpoint(ckpt: Path, weights_only: bool | None) -> dict[str, Any]:
    """The checkpoint, read as Lightning will load it (torch's weights_only default unless asked otherwise)."""
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # truncated zip, not a torch file, a global weights_only refuses, ...
        detail = " ".join(str(err).split())
        if "Weights only load failed" in detail:
            raise ValueError(f"--ckpt_path {ckpt} holds objects that a weights-only load refuses; fix: pass "
                             "--weights_only false if you trust the file (loading it runs code it names)") from None
        raise ValueError(f"--ckpt_path {ckpt} is not a readable checkpoint ({type(err).__name__}: {detail[:200]}); "
                         "fix: pass an intact .ckpt file (e.g. an earlier one of the run, step*.ckpt or best-*.ckpt) "
                         "or leave out --ckpt_path to train from scratch") from None
    return checkpoint

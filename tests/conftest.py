"""Shared fixtures: tiny synthetic CIFAR-10 copies, the real copy from ../shared/data, CLI runs in a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cutmix_pl import cifar

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def make_tiny_cifar(root: Path, n_train: int = 640, n_test: int = 200, seed: int = 0) -> Path:
    """Write a learnable synthetic CIFAR-10 (a colour per class plus noise) in the official layout."""
    gen = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (10, 3, 1, 1), generator=gen).float()

    def part(n: int) -> cifar.Split:
        labels = torch.arange(n) % 10
        labels = labels[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, 3, 32, 32, generator=gen) * 40
        images = (palette[labels] + noise).clamp(0, 255).to(torch.uint8)
        return cifar.Split(images, labels)

    cifar.write_batches(root, part(n_train), part(n_test))
    return root


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_cifar(tmp_path_factory.mktemp("tiny_cifar"))


@pytest.fixture(scope="session")
def real_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full CIFAR-10 copy: $CUTMIX_PL_DATA if .ci/run built it, else built here from ../shared/data."""
    given = os.environ.get("CUTMIX_PL_DATA")
    if given and cifar.find(given):
        return Path(given)
    if not (SHARED / "make_cifar10.py").is_file():
        pytest.skip(f"no CIFAR-10 copy: {SHARED} is missing and CUTMIX_PL_DATA is unset")
    out = tmp_path_factory.mktemp("real_cifar")
    subprocess.run([sys.executable, str(SHARED / "make_cifar10.py"), "--out", str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from an empty temporary folder, so CLI runs write their runs/ there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist (``-n``) the workers share the cores: each takes its part for torch, and so do the
    # processes its tests start (through OMP_NUM_THREADS), instead of every worker's torch using every core.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def expected_seconds(item: pytest.Item) -> float:
    """What a test's ``slow`` mark says it takes (``@pytest.mark.slow(seconds=...)``); 0 without one."""
    mark = item.get_closest_marker("slow")
    return 0.0 if mark is None else float(mark.kwargs.get("seconds", 1.0))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Longest first: with several workers (``-n``), a long test started last would run alone at the end.
    items.sort(key=expected_seconds, reverse=True)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def steps_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config that adds a checkpoint every 4 steps (see cli_runs.STEP_CHECKPOINTS)."""
    from cli_runs import STEP_CHECKPOINTS

    path = tmp_path_factory.mktemp("cfg") / "steps.yaml"
    path.write_text(STEP_CHECKPOINTS)
    return path


@pytest.fixture(scope="session")
def reference_run(tiny_cifar: Path, steps_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run (a subprocess, like the interrupted ones): its working folder, with metrics.json."""
    from cli_runs import finish, small, spawn

    cwd = tmp_path_factory.mktemp("reference")
    proc = spawn(cwd, ["fit", *small(tiny_cifar), "--config", str(steps_config)])
    assert finish(proc) == 0, (cwd / "run.err").read_text()[-3000:]
    return cwd

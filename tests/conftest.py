"""Shared fixtures and helpers: tiny synthetic CIFAR-10 copies, the real copy from ../shared/data, CLI runs in a temp
dir, the scripts as modules, a detector of reads from the device."""

from __future__ import annotations

import os
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cutmix_pl import cifar

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SCRIPTS = REPO / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module (the scripts are not a package), registered in sys.modules under NAME."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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


# -- reads from the device (tests/training/test_host_sync.py) -------------------------------------------
READS = {"_local_scalar_dense", "_unique2", "unique_dim", "unique_consecutive", "nonzero", "masked_select",
         "bincount", "equal", "lift_fresh", "lift_fresh_copy"}
# Tensor methods that read values back without an aten op on a CPU tensor: watched by patching them.
METHODS = ("tolist", "cpu", "numpy", "__array__")


class HostReads(TorchDispatchMode):
    """Names of the ops run inside the ``with`` block that read from, or copy host data to, the device."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_flatten(args[1:])[0])
        if name in READS or bool_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostReads:
        self._saved = {name: getattr(torch.Tensor, name) for name in METHODS}
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, self._watch(name, method))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        super().__exit__(*exc)

    def _watch(self, name: str, method: Any) -> Any:
        def watched(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.found.append(name)
            return method(t, *args, **kwargs)

        return watched

"""A plain (wheel) install carries the recipes: run from an unrelated folder, it resolves the same config as the
editable install (before the recipes moved into the package, it trained with no CutMix for 1000 epochs), the default
recipe and a named one (``--config smoke``: no such file there, so the packaged recipe)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

# `python -m cutmix_pl fit --print_config`, run through runpy in a process that first prints which cutmix_pl it
# imported: the path comes from the very process that printed the config, not from a second one.
PRINT_CONFIG = ("import runpy, cutmix_pl; print(cutmix_pl.__file__, flush=True); "
                "runpy.run_module('cutmix_pl', run_name='__main__', alter_sys=True)")


def print_config(cwd: Path, pythonpath: Path | None) -> tuple[Path, str]:
    """(where cutmix_pl was imported from, the printed config) for a run from ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, "-c", PRINT_CONFIG, "fit", "--config", "smoke", "--print_config"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    where, config = done.stdout.split("\n", 1)
    return Path(where), config


def build_artifacts() -> set[str]:
    """What a build run in the repo itself would leave there (the editable install's egg-info predates the test)."""
    return {p.name for p in REPO.iterdir() if p.name in ("build", "dist") or p.name.endswith(".egg-info")}


@pytest.mark.slow(seconds=15)
def test_a_wheel_install_prints_the_same_config_as_the_editable_one(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to copy its tracked files")
    before = build_artifacts()
    # the tracked package files only, copied: the build writes its build/ and egg-info into the copy, not the repo
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    src = tmp_path / "src"
    for name in filter(None, tracked.decode().split("\0")):
        if name.startswith(("cutmix_pl/", "pyproject.toml", "README.md")) and (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("cutmix_pl-*.whl"))
    assert "cutmix_pl/configs/cutmix.yaml" in zipfile.ZipFile(wheel).namelist()
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert build_artifacts() == before, "building the wheel left files in the repo"

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    where, installed = print_config(tmp_path / "a", site)
    assert where.is_relative_to(site), f"the wheel's package was not the one imported: {where}"
    where, editable = print_config(tmp_path / "b", None)
    assert where.is_relative_to(REPO), f"the editable install was not the one imported: {where}"
    # Compared as printed: no line of --print_config names a path of the install (the default config file it loaded
    # is not echoed), so nothing needs normalising. Should such a line appear, normalise that line only.
    assert installed == editable
    # the default recipe's values under smoke.yaml's
    for value in ("max_epochs: 1", "name: smoke", "class_path: cutmix_pl.augment.CutMix", "warmup_epochs: 1.0"):
        assert value in installed, value

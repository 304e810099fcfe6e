"""A plain (wheel) install carries the recipes: run from an unrelated folder, it resolves the same config as the
editable install (before the recipes moved into the package, it trained with no CutMix for 1000 epochs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


def print_config(cwd: Path, pythonpath: Path | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    code = "import cutmix_pl, sys; print(cutmix_pl.__file__); from cutmix_pl.cli import main; main(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, "fit", "--print_config"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_a_wheel_install_prints_the_same_config_as_the_editable_one(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to copy its tracked files")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    src = tmp_path / "src"
    for name in filter(None, tracked.decode().split("\0")):
        if name.startswith(("cutmix_pl/", "pyproject.toml", "README.md")):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("cutmix_pl-*.whl"))
    assert "cutmix_pl/configs/cutmix.yaml" in zipfile.ZipFile(wheel).namelist()
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    installed = print_config(tmp_path / "a", site)
    editable = print_config(tmp_path / "b", None)
    where, installed = installed.split("\n", 1)
    assert Path(where).is_relative_to(site), f"the wheel's package was not the one imported: {where}"
    where_editable, editable = editable.split("\n", 1)
    assert Path(where_editable).is_relative_to(REPO)
    # The one line that names an install path: the default config file the run loaded.
    norm = lambda text, root: text.replace(str(root / "cutmix_pl"), "<pkg>")  # noqa: E731
    assert norm(installed, site) == norm(editable, REPO)
    for value in ("max_epochs: 200", "class_path: cutmix_pl.augment.CutMix", "warmup_epochs: 1.0"):
        assert value in installed, value

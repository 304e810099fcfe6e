"""The packaged recipes (``configs/*.yaml`` inside the package; the top-level configs/ links here), and the
``--config`` arguments checked before jsonargparse reads them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "cutmix.yaml"


def recipe() -> dict[str, Any]:
    """The default recipe, configs/cutmix.yaml, as a dict."""
    return (yaml.safe_load(DEFAULT_CONFIG.read_text()) if DEFAULT_CONFIG.is_file() else None) or {}


def config_args(args: list[str]) -> list[str]:
    """``--config NAME`` of a packaged recipe as its path; each config file checked to be YAML, in one line naming
    the file and the place (jsonargparse names neither)."""
    args = list(args)
    for i, arg in enumerate(args):
        at = i + 1 if arg == "--config" and i + 1 < len(args) else i if arg.startswith("--config=") else None
        path = None if at is None else args[at].partition("=")[2] if at == i else args[at]
        if not path:
            continue
        if re.fullmatch(r"[\w.-]+", path) and not Path(path).exists():
            packaged = CONFIG_DIR / (path if path.endswith(".yaml") else f"{path}.yaml")
            if not packaged.is_file():
                names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
                raise ValueError(f"--config {path}: no such file, and no packaged recipe of that name ({names}); fix: "
                                 "pass the path of a YAML file, or one of those names")
            path = str(packaged)
            args[at] = f"--config={path}" if at == i else path
        if not Path(path).is_file():
            continue
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{path} is not valid YAML ({where}{problem}); fix: correct the file (keys as in "
                             "configs/cutmix.yaml)") from None
    return args

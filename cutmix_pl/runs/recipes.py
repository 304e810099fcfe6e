"""The packaged recipes (``configs/*.yaml`` inside the package; the top-level configs/ links here), and the
``--config`` arguments checked before jsonargparse reads them."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

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


def kept_on_class_change(args: list[str], mixer: Any) -> str | None:
    """A note when the command line changes ``data.mixer``'s class by name (``--data.mixer MixUp``): the CLI
    (jsonargparse) then keeps the values of the arguments the earlier class shares with the new one, so MixUp would
    run with CutMix's alpha and prob unannounced. Names those that differ from the class's own defaults and that
    the command line does not set itself."""
    named = [args[i + 1] if a == "--data.mixer" else a.partition("=")[2] for i, a in enumerate(args)
             if (a == "--data.mixer" and i + 1 < len(args)) or a.startswith("--data.mixer=")]
    if not named or named[-1].lstrip().startswith(("{", "null")) or not isinstance(mixer, Namespace):
        return None
    given = {a.partition("=")[0].rpartition(".")[2] for a in args if a.startswith("--data.mixer.")}
    module, _, name = str(mixer.get("class_path")).rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters  # resolved by the CLI
    values = mixer.get("init_args") or Namespace()
    kept = [k for k, v in values.items() if k in params and k not in given and not isinstance(v, Namespace)
            and params[k].default is not inspect.Parameter.empty and params[k].default != v]
    if not kept:
        return None
    return (f"data.mixer {name} runs with {', '.join(f'{k}={values[k]!r}' for k in kept)} from the config before "
            f"--data.mixer (a new class keeps the arguments the two share); {name}'s own defaults are "
            f"{', '.join(f'{k}={params[k].default!r}' for k in kept)}: pass "
            f"{' and '.join(f'--data.mixer.init_args.{k}' for k in kept)} to choose, or use a recipe (--config "
            "mixup, --config cutout)")

"""The package's top level: its re-exports, imported on first use."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import cutmix_pl


def test_each_export_is_its_module_class_and_type_checkers_see_the_same_names():
    for name in cutmix_pl.__all__:
        obj = getattr(cutmix_pl, name)
        assert obj is getattr(importlib.import_module(obj.__module__), name)
        assert obj.__name__ == name
    tree = ast.parse(Path(cutmix_pl.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {(a.name, a.asname) for imp in block.body for a in imp.names}
    assert {name for name, _ in seen} == set(cutmix_pl.__all__)
    assert all(name == alias for name, alias in seen), "an explicit re-export is written 'X as X'"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchThing"):
        cutmix_pl.NoSuchThing  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    # `python -m cutmix_pl` imports the package before its __main__ installs the start-up signal handlers
    code = "import sys, cutmix_pl; print('torch' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]

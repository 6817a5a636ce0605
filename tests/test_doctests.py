"""Every docstring example in cbs/ runs and prints what it says (doctest)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import cbs


def _modules() -> list[str]:
    names = [cbs.__name__]
    for info in pkgutil.walk_packages(cbs.__path__, prefix="cbs."):
        if not info.name.endswith(
            "__main__"
        ):  # importing a CLI entry point runs nothing, but skip it
            names.append(info.name)
    return names


def test_doctests_are_collected():
    total = sum(
        doctest.DocTestFinder().find(importlib.import_module(m)).__len__() for m in _modules()
    )
    examples = sum(
        len(t.examples)
        for m in _modules()
        for t in doctest.DocTestFinder().find(importlib.import_module(m))
    )
    assert total > 0 and examples >= 10, (total, examples)


@pytest.mark.parametrize("name", _modules())
def test_module_doctests(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} doctest examples failed in {name}"
    )

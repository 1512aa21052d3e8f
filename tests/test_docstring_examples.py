"""Every ``>>>`` example in lowbit's docstrings runs and prints what it says (doctest over all modules)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lowbit

MODULES = sorted(m.name for m in pkgutil.walk_packages(lowbit.__path__, "lowbit.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (output above)"


def test_the_examples_are_found():
    """The finder sees the examples (a module list or finder that found none would pass vacuously)."""
    found = sum(len(t.examples) for name in MODULES
                for t in doctest.DocTestFinder().find(importlib.import_module(name)))
    assert len(MODULES) > 80 and found > 60

"""Fixtures shared by the test files."""

import builtins
from collections.abc import Callable

import pytest


@pytest.fixture
def block_ipywidgets(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call the returned function to make every later ``import ipywidgets...`` raise ImportError (for this test)."""

    def block() -> None:
        real_import = builtins.__import__

        def no_widgets(name, *args, **kwargs):
            if name.startswith("ipywidgets"):
                raise ImportError("no ipywidgets here")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_widgets)

    return block

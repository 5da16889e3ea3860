"""Run the `>>>` examples in the docstrings of keras_oom.utils (issue 15)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["images", "text", "audio", "timeseries"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    """Kind docs: every example in the functions' docstrings runs as shown."""
    if name == "images":
        pytest.importorskip("PIL")
        pytest.importorskip("cv2")
    module = importlib.import_module(f"keras_oom.utils.{name}")
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0, f"no examples found in {module.__name__}"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed"

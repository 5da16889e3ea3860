"""Run the `>>>` examples in the docstrings of the public modules.

The docstrings are what `help()` and the API docs show; running them keeps
their examples true. `PrefetchLoaderDataset`'s examples start worker
processes, hence the timeout.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import doctest

import pytest

import keras_oom.dataset
import keras_oom.prefetch
import keras_oom.samples


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "module",
    [keras_oom.dataset, keras_oom.prefetch, keras_oom.samples],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module):
    result = doctest.testmod(
        module,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        report=True,
    )
    assert result.attempted > 0, f"no examples found in {module.__name__}"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed"

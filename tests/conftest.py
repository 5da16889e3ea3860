"""Shared pytest configuration.

The Keras backend must be chosen before keras is first imported, so it is set
here, at import time. ``setdefault`` lets ``KERAS_BACKEND=torch pytest`` (as
the ``tests-torch`` nox session does) pick another backend.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import _procs  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def no_leftover_workers():
    """Every test, not only the pool's: no worker process may outlive it."""
    before = _procs.worker_descendants()
    yield
    _procs.assert_no_new_workers(before)

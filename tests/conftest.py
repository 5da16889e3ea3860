"""Shared pytest configuration.

The Keras backend must be chosen before keras is first imported, so it is set
here, at import time. ``setdefault`` lets ``KERAS_BACKEND=torch pytest`` (as
the ``tests-torch`` nox session does) pick another backend.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

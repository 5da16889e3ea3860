"""Argument checks shared by every public class: one integer check, one for
seconds.

Each raises an error that names the parameter and the value received, as
Keras's own checks do. This module runs in workers too: it imports neither
Keras nor a backend.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

import numpy as np


def as_index(
    value: Any, name: str, *, minimum: int | None = None, what: str = "an integer"
) -> int:
    """`value` as an `int`, or an error naming `name`.

    Accepts what `operator.index` accepts (Python and NumPy integers, 0-d
    integer arrays) and refuses bools, Python's and NumPy's: `True` is never
    an intended count or index.

    Args:
        value: The argument received.
        name: The parameter's name, for the message.
        minimum: The smallest value allowed, or None.
        what: What the parameter must be, for the message (e.g.
            `"a positive integer"`).

    Returns:
        The integer.

    Raises:
        TypeError: If `value` is a bool or not an integer.
        ValueError: If `value` is below `minimum`.
    """
    if isinstance(value, (bool, np.bool_)):
        index = None
    else:
        try:
            index = operator.index(value)
        except TypeError:
            index = None
    if index is None:
        raise TypeError(
            f"`{name}` must be {what}. Received: {name}={value!r} "
            f"of type {type(value).__name__}"
        )
    if minimum is not None and index < minimum:
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value}")
    return index


def as_seconds(value: Any, name: str) -> float | None:
    """A positive number of seconds, or None (`None` and `inf`: no limit).

    Raises:
        TypeError: If `value` is a bool or not a real number.
        ValueError: If `value` is not positive (NaN included).
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a number of seconds or None. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    seconds = float(value)
    if not seconds > 0:  # also NaN
        raise ValueError(f"`{name}` must be positive. Received: {name}={value}")
    return None if seconds == float("inf") else seconds

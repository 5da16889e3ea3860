"""`batch_array`: `np.empty` for a loader's batch, in shared memory in a worker.

In a `PrefetchLoaderDataset` worker `batch_array(shape, dtype)` returns an
array that lives in the worker's shared memory, so the batch reaches the
caller with no copy at all (transport.py); everywhere else it is `np.empty`.
`stack_samples` (samples.py) builds its batches with it.

This module runs in workers too: it imports neither Keras nor a backend.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, SupportsIndex

import numpy as np

from keras_oom import transport


def batch_array(
    shape: SupportsIndex | Sequence[SupportsIndex], dtype: Any = float, order: Any = "C"
) -> np.ndarray:
    """Returns an uninitialised array to build a batch in, like `np.empty`.

    Call it in a loader in place of `np.empty` for the batch (or for each
    array of a multi-input batch), fill it, and return it. It accepts
    exactly what `np.empty(shape, dtype, order=order)` accepts and gives an
    array of the same shape, dtype and strides (a subarray dtype such as
    `np.dtype((np.float32, (3,)))` adds its dimensions to `shape`, as in
    NumPy), or raises the same error type, in every process. In the
    caller's process (a `LoaderDataset`, or any process that is not a
    `PrefetchLoaderDataset` worker) it is `np.empty`. In a worker it is an
    array in the worker's shared memory, which the parent maps: returned
    (alone, or in a tuple or dict), it crosses to the caller with no copy
    at all. A view of it (`out[:n]`) crosses in place too.

    An array that the loader allocates but does not return gives its memory
    back once the loader drops it. A loader may also keep one and refill it
    for every batch: the batches the caller already holds never change (the
    first send is in place, later ones are copies). Arrays below 64 KiB,
    and arrays holding Python objects, are always plain `np.empty`: small
    batches go through the worker's socket anyway.

    Args:
        shape: The array's shape: an int or a sequence of ints (NumPy
            integers and 0-d integer arrays too), as for `np.empty`.
        dtype: The array's dtype, anything `np.dtype` accepts. Defaults to
            `float` (float64), as for `np.empty`.
        order: `"C"` (row-major, the default) or `"F"` (column-major), as
            for `np.empty`.

    Returns:
        A writable `np.ndarray`, contiguous in `order`, of `shape` and
        `dtype`, its contents arbitrary.

    Raises:
        TypeError: If `shape` is not an int or a sequence of ints (an
            iterator is not a sequence), `dtype` is not a dtype, or `order`
            is not a string.
        ValueError: If a dimension of `shape` is negative, the array would
            be larger than the address space, or `order` is not `"C"` or
            `"F"`.
        MemoryError: If `np.empty` cannot allocate it.

    Example:

    ```python
    >>> import numpy as np
    >>> from keras_oom import LoaderDataset, batch_array
    >>> def loader(ids):
    ...     out = batch_array((len(ids), 3), np.float32)
    ...     out[:] = np.asarray(ids)[:, None]
    ...     return out
    >>> LoaderDataset(loader, np.arange(4), batch_size=2)[1].tolist()
    [[2.0, 2.0, 2.0], [3.0, 3.0, 3.0]]

    ```
    """
    # NumPy itself decides what the arguments mean: one rule in every
    # process. The allocation is virtual (pages are touched only when
    # written), so making it and dropping it in a worker costs microseconds.
    try:
        template = np.empty(shape, dtype, order=order)
    except (TypeError, ValueError) as e:
        raise type(e)(_refusal(shape, dtype, order, e)) from None
    fortran = template.flags.f_contiguous and not template.flags.c_contiguous
    out = transport.shared_empty(
        template.shape, template.dtype, "F" if fortran else "C"
    )
    return template if out is None else out


def _refusal(shape: Any, dtype: Any, order: Any, error: BaseException) -> str:
    """Why `np.empty` refused `batch_array`'s arguments, naming one of them."""
    try:
        np.dtype(dtype)
    except (TypeError, ValueError):
        return (
            f"`dtype` must be a NumPy dtype, as for np.empty. Received: "
            f"dtype={dtype!r} ({error})"
        )
    try:
        np.empty(0, order=order)
    except (TypeError, ValueError):
        return (
            f"`order` must be 'C' or 'F', as for np.empty. Received: "
            f"order={order!r} ({error})"
        )
    hint = " An iterator is not a sequence: pass tuple(shape)." * isinstance(
        shape, Iterator
    )
    return (
        f"`shape` must be an int or a sequence of ints, none negative, as for "
        f"np.empty. Received: shape={shape!r} with dtype={np.dtype(dtype)} "
        f"({error}).{hint}"
    )

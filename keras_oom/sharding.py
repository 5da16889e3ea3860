"""Which part of the data this process reads in multi-process training.

In data-parallel training across processes (one per host, usually), each
process must read its own disjoint part of every epoch, and every process
must run the same number of steps, or the collective ops wait forever.
This module holds the split (`shard_positions`, `shard_size`: pure
arithmetic on one epoch's order, which indexing.py's `BatchPlan` applies),
validates a user's `shard` argument and, for `shard="auto"`, asks the
running distribution which process this is.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from keras_oom.checks import as_index

SHARD_MODES = ("pad", "drop")


def shard_size(num_samples: int, count: int, mode: str) -> int:
    """Samples per shard when `num_samples` are split `count` ways."""
    if mode == "pad":
        return -(-num_samples // count)
    return num_samples // count


def shard_positions(order: np.ndarray, index: int, count: int, mode: str) -> np.ndarray:
    """The part of one epoch's `order` that shard `index` of `count` reads.

    Shards take every `count`-th sample of the epoch's order, starting at
    `index`, so they are disjoint and, with a shared seed, together cover the
    epoch. All shards get the same number of samples, so that every process
    runs the same number of steps: with `mode="pad"` the order is extended by
    repeating its first samples (a few samples are then seen twice per
    epoch), with `mode="drop"` its last `len(order) % count` samples are left
    out of this epoch.
    """
    if count == 1:
        return order
    total = shard_size(len(order), count, mode) * count
    # np.resize repeats the order cyclically, also when count > len(order).
    full = np.resize(order, total) if mode == "pad" else order[:total]
    return full[index::count]


def resolve_shard(shard: Any, shard_mode: str) -> tuple[int, int]:
    """Turns the `shard` argument into `(index, count)`.

    Args:
        shard: `None` (one process), `(index, count)`, or `"auto"`.
        shard_mode: `"pad"` or `"drop"`.

    Returns:
        `(index, count)` with `0 <= index < count`.

    Raises:
        ValueError: For an unknown `shard_mode` or `shard` string, or an
            index out of range.
        TypeError: For a `shard` that is not a pair of integers (Python
            or NumPy; bools are refused).
    """
    if shard_mode not in SHARD_MODES:
        raise ValueError(
            f"`shard_mode` must be one of {SHARD_MODES}. "
            f"Received: shard_mode={shard_mode!r}"
        )
    if shard is None:
        return 0, 1
    if isinstance(shard, str):
        if shard != "auto":
            raise ValueError(
                f"`shard` must be None, 'auto' or (index, count). "
                f"Received: shard={shard!r}"
            )
        return auto_shard()
    try:
        index, count = (as_index(v, "shard") for v in shard)
    except (TypeError, ValueError):
        raise TypeError(
            f"`shard` must be None, 'auto' or a pair of integers (index, count). "
            f"Received: shard={shard!r}"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"`shard` must be (index, count) with 0 <= index < count. "
            f"Received: shard={shard!r}"
        )
    return index, count


def auto_shard() -> tuple[int, int]:
    """Reads `(process index, process count)` from the running distribution.

    JAX (`jax.distributed.initialize`, which `keras.distribution.initialize`
    calls) answers through `jax.process_index()` and `jax.process_count()`;
    TensorFlow's multi-worker strategies through their cluster resolver.
    Where no multi-process run is set up, this is `(0, 1)`: a no-op.
    """
    backend = os.environ.get("KERAS_BACKEND", "")
    if "jax" in sys.modules or backend == "jax":
        import jax

        if jax.process_count() > 1:
            return jax.process_index(), jax.process_count()
    if "tensorflow" in sys.modules:
        shard = _tensorflow_shard(sys.modules["tensorflow"])
        if shard is not None:
            return shard
    return 0, 1


def _tensorflow_shard(tf: Any) -> tuple[int, int] | None:
    """This task's shard under a TensorFlow multi-worker strategy, if any.

    TensorFlow's own numbering (`multi_worker_util.id_in_cluster` and
    `worker_count`): the chief, if there is one, trains too and is worker
    0; worker `i` comes after it, at `i + len(chief)`. An evaluator (and a
    parameter server) is not part of the training cluster, so it reads
    everything, as one process does.
    """
    strategy = tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if resolver is None or task_type not in ("chief", "worker"):
        return None
    cluster = resolver.cluster_spec().as_dict()
    chiefs = len(cluster.get("chief", []))
    count = chiefs + len(cluster.get("worker", []))
    if count <= 1:
        return None
    index = 0 if task_type == "chief" else int(resolver.task_id) + chiefs
    return index, count

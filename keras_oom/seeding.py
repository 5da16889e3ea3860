"""Per-batch randomness as a pure function of `(seed, epoch, position)`.

A batch's random numbers must not depend on which worker loads it, how many
workers there are, how they were started, or in which order batches are
requested. So, as Grain and `tf.data`'s stateless ops do, every batch gets
its own generator, derived from three numbers only:

    SeedSequence(seed, spawn_key=(_DOMAIN, epoch, position))

- `seed` is the dataset's seed (`ds.seed`), the same one that drives the
  shuffle;
- `epoch` is the epoch whose order the batch belongs to;
- `position` is the batch's place in the whole, unsharded epoch:
  `batch * shard_count + shard_index` (`batch_position`). Shards read
  interleaved slices of each epoch's order, so this numbers every batch of
  every shard once, and two processes of a data-parallel run never share a
  stream.

`_DOMAIN` keeps these streams apart from the epoch permutations of
`indexing.py`, which come from `default_rng([seed, epoch])`: a different
entropy pool, so the augmentation of a batch is not correlated with the order
its samples were drawn in.

This module runs in worker processes: numpy and the standard library only,
never Keras, and torch only when the process has already imported it.
"""

from __future__ import annotations

import functools
import inspect
import random
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_oom.checks import as_index

# "koom" in ASCII: the first word of every batch stream's spawn key.
_DOMAIN = 0x6B6F6F6D

_RNG_KINDS = (
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    inspect.Parameter.KEYWORD_ONLY,
)


def batch_position(batch: int, shard: tuple[int, int]) -> int:
    """Returns the place of a shard's batch in the whole, unsharded epoch.

    Shard `index` of `count` reads every `count`-th sample of an epoch's
    order starting at `index` (see `sharding.shard_positions`), so its batch
    `b` is the `b`-th of `count` interleaved batches: position
    `b * count + index`. Without sharding (`(0, 1)`) the position is the
    batch number.

    Args:
        batch: Batch number within the shard's epoch, `>= 0`.
        shard: `(index, count)` with `0 <= index < count`.

    Returns:
        The position, a non-negative integer unique to `(batch, shard)`.

    Raises:
        TypeError: If `batch` or a part of `shard` is not an integer.
        ValueError: If `batch < 0` or `shard` is not a valid
            `(index, count)` pair.

    Example:

    ```python
    >>> from keras_oom.seeding import batch_position
    >>> batch_position(3, (0, 1))
    3
    >>> [batch_position(b, (i, 2)) for b in range(2) for i in range(2)]
    [0, 1, 2, 3]

    ```
    """
    batch = _non_negative(batch, "batch")
    try:
        index, count = shard
    except (TypeError, ValueError):
        raise TypeError(
            f"`shard` must be a pair (index, count). Received: shard={shard!r}"
        ) from None
    index = _non_negative(index, "shard index")
    count = _non_negative(count, "shard count")
    if not index < count:
        raise ValueError(
            f"`shard` must satisfy 0 <= index < count. Received: shard={shard!r}"
        )
    return batch * count + index


def batch_seed(seed: int, epoch: int, position: int) -> np.random.SeedSequence:
    """Returns the `SeedSequence` of one batch, from three numbers only.

    It is the child `(_DOMAIN, epoch, position)` of `SeedSequence(seed)`:
    equal arguments give equal sequences in any process, and any two
    different argument triples give independent streams.

    Args:
        seed: The dataset's seed, `>= 0`.
        epoch: The epoch the batch belongs to, `>= 0`.
        position: The batch's place in the unsharded epoch, `>= 0`
            (see `batch_position`).

    Returns:
        A `numpy.random.SeedSequence`.

    Raises:
        TypeError: If an argument is not an integer.
        ValueError: If an argument is negative.

    Example:

    ```python
    >>> from keras_oom.seeding import batch_seed
    >>> a = batch_seed(0, 1, 2).generate_state(2)
    >>> b = batch_seed(0, 1, 2).generate_state(2)
    >>> bool((a == b).all())
    True

    ```
    """
    return np.random.SeedSequence(
        _non_negative(seed, "seed"),
        spawn_key=(
            _DOMAIN,
            _non_negative(epoch, "epoch"),
            _non_negative(position, "position"),
        ),
    )


def batch_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """Returns a fresh generator for one batch: PCG64 seeded by `batch_seed`.

    Args:
        seed: The dataset's seed, `>= 0`.
        epoch: The epoch the batch belongs to, `>= 0`.
        position: The batch's place in the unsharded epoch, `>= 0`.

    Returns:
        A `numpy.random.Generator` no other batch shares.

    Example:

    ```python
    >>> from keras_oom.seeding import batch_rng
    >>> batch_rng(7, 0, 5).random() == batch_rng(7, 0, 5).random()
    True
    >>> batch_rng(7, 0, 5).random() == batch_rng(7, 0, 6).random()
    False

    ```
    """
    return np.random.Generator(np.random.PCG64(batch_seed(seed, epoch, position)))


def seed_global_generators(seq: np.random.SeedSequence) -> None:
    """Reseeds the process's global generators from `seq`.

    For loaders that draw from `np.random.*`, `random.*` or `torch.*`
    directly: seeded from a batch's `batch_seed`, they draw a stream of
    their own per batch, the same in every worker. Reseeds:

    - numpy's legacy global generator (`np.random.seed`), with 4 words of
      `seq`'s state;
    - Python's `random`, with 4 other words (the same words would put both
      Mersenne Twisters in the same state, so that `np.random.random()` and
      `random.random()` returned the same numbers);
    - torch's default generator (`torch.manual_seed`), only if this process
      has already imported torch: importing it here would cost a worker
      seconds and memory for loaders that never use it.

    Args:
        seq: A `numpy.random.SeedSequence`, usually `batch_seed(...)`. It is
            only read (no children are spawned from it).
    """
    words = seq.generate_state(10, dtype=np.uint32)
    np.random.seed(words[0:4])
    random.seed(int.from_bytes(words[4:8].tobytes(), "little"))
    torch = sys.modules.get("torch")
    manual_seed = getattr(torch, "manual_seed", None)
    if manual_seed is not None:
        # 63 bits: torch accepts any uint64, but older versions reject the
        # upper half as a negative int64.
        manual_seed(int.from_bytes(words[8:10].tobytes(), "little") >> 1)


def accepts_rng(fn: Callable[..., Any]) -> bool:
    """Whether `fn` wants a generator, as `fn(ids, rng=rng)`.

    True when `fn`'s signature declares a parameter named exactly `rng`
    that can be passed by keyword, the way Keras passes `training` to a
    layer's `call` only when `call` declares it. A `**kwargs` catch-all does
    not count. Works for functions, lambdas, bound methods,
    `functools.partial` objects and callable instances (their `__call__`),
    also after a round trip through `cloudpickle`.

    A `functools.partial` that already binds `rng` by keyword keeps its
    generator: the caller chose it, so this returns False.

    Args:
        fn: The loader (or a dataset's bound `load`).

    Returns:
        True if `fn` should be called with `rng=`; False otherwise,
        including when `fn` has no inspectable signature (some builtins).

    Example:

    ```python
    >>> from keras_oom.seeding import accepts_rng
    >>> accepts_rng(lambda ids, rng: ids)
    True
    >>> accepts_rng(lambda ids, **kwargs: ids)
    False
    >>> accepts_rng(len)
    False

    ```
    """
    if isinstance(fn, functools.partial) and "rng" in fn.keywords:
        return False
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    param = signature.parameters.get("rng")
    return param is not None and param.kind in _RNG_KINDS


def _non_negative(value: Any, name: str) -> int:
    return as_index(value, name, minimum=0, what="a non-negative integer")

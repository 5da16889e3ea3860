"""Which samples make up batch `b` of epoch `e`: pure functions of the seed.

Every order here is a function of `(seed, epoch)` alone, never of call
history, so two datasets built with the same arguments yield the same
batches, a prefetching worker pool can compute the next epoch's batches
before the consumer gets there, and a run can resume at any epoch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from keras_oom.checks import as_index

# The shard arithmetic is sharding.py's; importable from here, as it was.
from keras_oom.sharding import SHARD_MODES, shard_positions, shard_size

__all__ = [
    "SHARD_MODES",
    "BatchPlan",
    "epoch_permutation",
    "locate",
    "shard_positions",
    "shard_size",
]


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Returns the sample order of `epoch`, a permutation of `num_samples`.

    The permutation depends only on `(seed, epoch)`: NumPy's `SeedSequence`
    mixes both into independent streams, so consecutive epochs are not
    correlated and no state is carried from one epoch to the next.

    Args:
        num_samples: Number of samples to permute.
        seed: Non-negative integer seed.
        epoch: Non-negative epoch number.

    Returns:
        A 1-D `int64` array holding a permutation of `range(num_samples)`.
    """
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_samples)


class BatchPlan:
    """Maps `(epoch, batch)` to the positions of the batch's samples.

    Args:
        num_samples: Number of samples in one epoch, across all shards.
        batch_size: Samples per batch.
        shuffle: Whether each epoch visits the samples in its own order.
        seed: Seed of the epoch orders (used only with `shuffle=True`).
        drop_remainder: Whether to drop the last, smaller batch.
        shard: `(index, count)`: this plan covers shard `index` of `count`
            disjoint parts of every epoch (see `shard_positions`).
        shard_mode: `"pad"` or `"drop"`, how shards are made equal.
    """

    # Prefetching looks one epoch ahead while the consumer finishes the
    # current one, so two permutations are live at once; keep a spare.
    _CACHED_EPOCHS = 3

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_remainder: bool,
        shard: tuple[int, int] = (0, 1),
        shard_mode: str = "pad",
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.shard = shard
        self.shard_mode = shard_mode
        self.shard_samples = shard_size(num_samples, shard[1], shard_mode)
        if drop_remainder:
            self.batches_per_epoch = self.shard_samples // batch_size
        else:
            self.batches_per_epoch = -(-self.shard_samples // batch_size)
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._fixed_order: np.ndarray | None = None
        if not shuffle:
            self._fixed_order = shard_positions(
                np.arange(num_samples), *shard, shard_mode
            )
            self._fixed_order.flags.writeable = False

    def order(self, epoch: int) -> np.ndarray:
        """Returns the positions of this shard's samples in the order of `epoch`."""
        if self._fixed_order is not None:
            return self._fixed_order
        with self._lock:
            order = self._orders.get(epoch)
            if order is not None:
                self._orders.move_to_end(epoch)
                return order
        # Computed outside the lock: a permutation of millions of samples
        # takes milliseconds, and a duplicate computation is harmless.
        order = shard_positions(
            epoch_permutation(self.num_samples, self.seed, epoch),
            *self.shard,
            self.shard_mode,
        )
        order.flags.writeable = False
        with self._lock:
            self._orders[epoch] = order
            while len(self._orders) > self._CACHED_EPOCHS:
                self._orders.popitem(last=False)
        return order

    def positions(self, epoch: int, batch: int) -> np.ndarray:
        """Returns the sample positions of batch `batch` of epoch `epoch`.

        Args:
            epoch: Epoch number, `>= 0`.
            batch: Batch number within the epoch, in
                `range(batches_per_epoch)`.

        Returns:
            A 1-D integer array of positions into the sample ids.
        """
        start = batch * self.batch_size
        return self.order(epoch)[start : start + self.batch_size]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_orders"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def locate(
    index: object, epoch: int, start: int, per_epoch: int, repeat: bool
) -> tuple[int, int]:
    """Turns a dataset index into the `(epoch, batch)` it reads.

    Index 0 reads batch `start` of `epoch`, and index `i` stream position
    `epoch * per_epoch + start + i`, where position `g` is batch
    `g % per_epoch` of epoch `g // per_epoch`.

    Args:
        index: The index the caller gave (`ds[index]`); negative counts
            from the end of the epoch, unless `repeat`.
        epoch: The epoch index 0 reads from (`ds.epoch`).
        start: The batch of `epoch` that index 0 reads.
        per_epoch: Batches per epoch.
        repeat: Whether the dataset is endless (any index `>= 0` is valid).

    Returns:
        `(epoch, batch)`, with `batch` in `range(per_epoch)`.

    Raises:
        TypeError: If `index` is not an integer.
        IndexError: If `index` is out of range.
    """
    i = as_index(index, "index")
    if repeat:
        if i < 0:
            raise IndexError(f"Negative index {i} on an endless (repeat=True) dataset.")
    elif not -per_epoch <= i < per_epoch:
        raise IndexError(
            f"Batch index {i} out of range for {per_epoch} batches per epoch."
        )
    else:
        i %= per_epoch
    ahead, batch = divmod(start + i, per_epoch)
    return epoch + ahead, batch

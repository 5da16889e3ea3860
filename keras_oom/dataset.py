"""`LoaderDataset`: a `keras.utils.PyDataset` over a loader and sample ids."""

from __future__ import annotations

import operator
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np

from keras_oom.errors import add_note, describe_ids
from keras_oom.indexing import BatchPlan, shard_size
from keras_oom.sharding import resolve_shard

Labels = Any  # an array-like, or a dict / tuple of array-likes


class LoaderDataset(keras.utils.PyDataset):
    """A Keras `PyDataset` that loads each batch with a loader function.

    The dataset maps batch index `i` to the ids of the batch's samples
    (`batch_ids(i)`), calls `loader(ids)` to load them, and pairs the result
    with the batch's labels. Only one batch is in memory at a time, so the
    data may be far larger than RAM.

    Each epoch visits every sample exactly once (all but the last
    `len(sample_ids) % batch_size` with `drop_remainder=True`). With
    `shuffle=True`, the samples themselves (not only the batch order) are
    shuffled once per epoch, in an order that is a pure function of
    `(seed, epoch)`: two datasets with the same seed yield the same batches.

    Args:
        loader: A callable `loader(ids) -> x` that receives a 1-D
            `numpy.ndarray` with the ids of one batch and returns the batch's
            inputs (an array, or a tuple / dict of arrays for multi-input
            models). May be omitted when a subclass overrides `load`.
        sample_ids: A 1-D array-like of sample ids (ints, strings, paths...),
            passed to the loader in batches.
        labels: Optional labels aligned with `sample_ids`: an array-like of
            the same length, or a dict / tuple of such for multi-output
            models. With labels, `ds[i]` returns `(x, y)`; without, it
            returns what the loader returns.
        batch_size: Number of samples per batch, at most `len(sample_ids)`.
        shuffle: Whether to shuffle the samples anew in each epoch.
        seed: Seed of the shuffle. `None` draws one at construction, kept in
            `ds.seed`.
        drop_remainder: Whether to drop the last batch when it is smaller
            than `batch_size`.
        repeat: Whether to loop over the data endlessly, as the original R
            generator did: `num_batches` is then `None`, index `i` is batch
            `i % batches_per_epoch` of epoch `epoch + i // batches_per_epoch`
            (reshuffled per epoch), and `fit` needs
            `steps_per_epoch=ds.batches_per_epoch`.
        shard: For data-parallel training across processes: `(index, count)`
            makes this dataset read only part `index` of `count` disjoint
            parts of every epoch (every `count`-th sample of the epoch's
            order), with the same number of batches in every process.
            `"auto"` reads the process index and count from the running
            distribution (JAX's `jax.process_index()` /
            `jax.process_count()`, TensorFlow's multi-worker strategies) and
            is a no-op in a single process. With `shuffle=True` every
            process must pass the same explicit `seed`.
        shard_mode: How shards are made equal when `count` does not divide
            `len(sample_ids)`: `"pad"` (default) repeats the first samples
            of the epoch's order, so a few samples are seen twice per epoch;
            `"drop"` leaves the last `len(sample_ids) % count` samples of the
            epoch's order out (different ones each epoch when shuffled).
        **kwargs: `workers`, `use_multiprocessing` and `max_queue_size`,
            passed unchanged to `keras.utils.PyDataset`.

    Raises:
        TypeError: If `loader` is not callable (or is missing without a
            `load` override), or `batch_size` is not an integer.
        ValueError: If `sample_ids` is empty or not 1-D, `labels` differ in
            length from `sample_ids`, `batch_size` is not in
            `[1, len(sample_ids)]` (per shard when sharded), `shard` is out of
            range, or a shuffled sharded dataset has no `seed`.

    Example:

    ```python
    >>> import numpy as np
    >>> from keras_oom import LoaderDataset
    >>> ds = LoaderDataset(lambda ids: ids * 10, np.arange(5), labels=np.arange(5),
    ...                    batch_size=2)
    >>> len(ds)
    3
    >>> x, y = ds[2]
    >>> x.tolist(), y.tolist()
    ([40], [4])

    ```
    """

    def __init__(
        self,
        loader: Callable[[np.ndarray], Any] | None = None,
        sample_ids: Any = None,
        labels: Labels = None,
        *,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int | None = None,
        drop_remainder: bool = False,
        repeat: bool = False,
        shard: tuple[int, int] | str | None = None,
        shard_mode: str = "pad",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if loader is None:
            if type(self).load is LoaderDataset.load:
                raise TypeError(
                    "`loader` is required unless a subclass overrides "
                    "`load(self, ids)`. Received: loader=None"
                )
        elif not callable(loader):
            raise TypeError(
                f"`loader` must be callable, as loader(ids) -> x. "
                f"Received: loader={loader!r} of type {type(loader).__name__}"
            )
        self._loader = loader
        self._sample_ids = _as_sample_ids(sample_ids)
        n = len(self._sample_ids)
        self._labels = _as_labels(labels, n)
        shard_index, shard_count = resolve_shard(shard, shard_mode)
        if shard_count > 1 and shuffle and seed is None:
            raise ValueError(
                f"`seed` must be given when shuffling a sharded dataset: every "
                f"process must draw the same order for the shards to be "
                f"disjoint. Received: seed=None, shard=({shard_index}, "
                f"{shard_count})"
            )
        per_shard = shard_size(n, shard_count, shard_mode)
        if per_shard == 0:
            raise ValueError(
                f"`shard_mode='drop'` leaves no samples: {n} sample ids split "
                f"{shard_count} ways. Received: shard=({shard_index}, "
                f"{shard_count})"
            )
        _check_batch_size(batch_size, per_shard)
        self._seed = _as_seed(seed)
        self._repeat = bool(repeat)
        self._plan = BatchPlan(
            n,
            int(batch_size),
            shuffle=bool(shuffle),
            seed=self._seed,
            drop_remainder=bool(drop_remainder),
            shard=(shard_index, shard_count),
            shard_mode=shard_mode,
        )
        self._epoch = 0

    # -- what Keras reads ---------------------------------------------------

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch, or `None` with `repeat=True` (endless)."""
        return None if self._repeat else self._plan.batches_per_epoch

    def __len__(self) -> int:
        if self._repeat:
            raise TypeError(
                "A dataset with repeat=True is endless and has no len(); "
                "use `batches_per_epoch` for `steps_per_epoch`."
            )
        return self._plan.batches_per_epoch

    def __getitem__(self, index: int) -> Any:
        """Loads batch `index` of the current epoch.

        Args:
            index: Batch index. Negative values count from the end of the
                epoch (not with `repeat=True`).

        Returns:
            `(x, y)` with labels, else `x`, the loader's return value.

        Raises:
            IndexError: If `index` is out of range.
        """
        epoch, batch = self._locate(index)
        ids = self._sample_ids[self._plan.positions(epoch, batch)]
        x = self._load_noted(self._global_index(epoch, batch), ids)
        return self._with_labels(x, epoch, batch)

    def on_epoch_end(self) -> None:
        """Advances to the next epoch's order (a no-op with `repeat=True`).

        Keras calls this after every pass over the data (`fit` epochs, and
        `evaluate` / `predict` runs).
        """
        if not self._repeat:
            self._epoch += 1

    # -- public helpers -----------------------------------------------------

    def load(self, ids: np.ndarray) -> Any:
        """Loads the samples `ids` and returns the batch's inputs `x`.

        Calls the `loader` given at construction. Subclasses may override
        this instead of passing a loader.

        Args:
            ids: 1-D array of the batch's sample ids.

        Returns:
            The batch's inputs.
        """
        assert self._loader is not None
        return self._loader(ids)

    def batch_ids(self, index: int) -> np.ndarray:
        """Returns the sample ids of batch `index` in the current epoch.

        `ds[index]` is `ds.load(ds.batch_ids(index))`, paired with labels.

        Args:
            index: Batch index, as for `ds[index]`.

        Returns:
            A 1-D array of sample ids.
        """
        epoch, batch = self._locate(index)
        return self._sample_ids[self._plan.positions(epoch, batch)]

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch whose sample order the batches follow.

        Args:
            epoch: Non-negative epoch number, e.g. to resume a run.
        """
        epoch = _as_index(epoch, "epoch")
        if epoch < 0:
            raise ValueError(f"`epoch` must be >= 0. Received: epoch={epoch}")
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        """The current epoch (advanced by `on_epoch_end`)."""
        return self._epoch

    @property
    def seed(self) -> int:
        """The shuffle seed (drawn at construction when `seed=None`)."""
        return self._seed

    @property
    def batch_size(self) -> int:
        """Samples per batch."""
        return self._plan.batch_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one epoch; pass it as `steps_per_epoch` with `repeat`."""
        return self._plan.batches_per_epoch

    @property
    def sample_ids(self) -> np.ndarray:
        """The sample ids, as a 1-D array (in their original order)."""
        return self._sample_ids

    @property
    def shard(self) -> tuple[int, int]:
        """`(index, count)`: the part of every epoch this dataset reads."""
        return self._plan.shard

    @property
    def shuffle(self) -> bool:
        return self._plan.shuffle

    @property
    def drop_remainder(self) -> bool:
        return self._plan.drop_remainder

    @property
    def repeat(self) -> bool:
        return self._repeat

    # -- internals shared with the prefetching subclass ---------------------

    def _locate(self, index: Any) -> tuple[int, int]:
        """Turns a user index into `(epoch, batch)`, checking its range."""
        i = _as_index(index, "index")
        per_epoch = self._plan.batches_per_epoch
        if self._repeat:
            if i < 0:
                raise IndexError(
                    f"Negative index {i} on an endless (repeat=True) dataset."
                )
            return self._epoch + i // per_epoch, i % per_epoch
        if not -per_epoch <= i < per_epoch:
            raise IndexError(
                f"Batch index {i} out of range for {per_epoch} batches per epoch."
            )
        return self._epoch, i % per_epoch

    def _global_index(self, epoch: int, batch: int) -> int:
        """The index Keras used for `(epoch, batch)`, for messages."""
        if self._repeat:
            return (epoch - self._epoch) * self._plan.batches_per_epoch + batch
        return batch

    def _load_noted(self, index: int, ids: np.ndarray) -> Any:
        try:
            return self.load(ids)
        except Exception as e:
            add_note(
                e, f"keras_oom: while loading batch {index}, ids {describe_ids(ids)}"
            )
            raise

    def _with_labels(self, x: Any, epoch: int, batch: int) -> Any:
        if self._labels is None:
            return x
        pos = self._plan.positions(epoch, batch)
        labels = self._labels
        if isinstance(labels, dict):
            return x, {k: v[pos] for k, v in labels.items()}
        if isinstance(labels, tuple):
            return x, tuple(v[pos] for v in labels)
        return x, labels[pos]


def _as_index(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an integer. Received: {name}={value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"`{name}` must be an integer. Received: {name}={value!r} "
            f"of type {type(value).__name__}"
        ) from None


def _as_sample_ids(sample_ids: Any) -> np.ndarray:
    import reprlib  # only this function needs it

    def refuse(problem: str) -> ValueError:
        # One line, and bounded: the ids may be millions long.
        short = reprlib.Repr()
        short.maxlevel, short.maxstring, short.maxother = 3, 60, 80
        short.maxlist = short.maxtuple = short.maxset = short.maxdict = 6
        received = " ".join(short.repr(sample_ids).split())
        return ValueError(f"`sample_ids` {problem} Received: sample_ids={received}")

    scalars = (
        "must be a 1-D array-like with one scalar id (int, str, path, ...) per "
        "sample, not a ragged or nested sequence."
    )
    if sample_ids is None:
        raise ValueError("`sample_ids` is required. Received: sample_ids=None")
    try:
        ids = np.asarray(sample_ids)
    except (ValueError, TypeError):
        # NumPy refuses ragged nesting ("inhomogeneous shape") in its own
        # words, which do not say which argument was wrong.
        raise refuse(scalars) from None
    if ids.ndim != 1:
        raise refuse(f"must be 1-D: one id per sample, got shape {ids.shape}.")
    if len(ids) == 0:
        raise ValueError("`sample_ids` must not be empty. Received: 0 sample ids")
    # An object array of sequences is 1-D for NumPy, but its "ids" are
    # ragged rows, not one id per sample.
    if ids.dtype == object and any(
        isinstance(v, (list, tuple, np.ndarray)) for v in ids
    ):
        raise refuse(scalars)
    return ids


def _as_labels(labels: Labels, n: int) -> Any:
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        return {k: _as_label_array(v, n, f"labels[{k!r}]") for k, v in labels.items()}
    if isinstance(labels, tuple):
        return tuple(
            _as_label_array(v, n, f"labels[{i}]") for i, v in enumerate(labels)
        )
    return _as_label_array(labels, n, "labels")


def _as_label_array(values: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 0 or len(arr) != n:
        length = "a scalar" if arr.ndim == 0 else f"length {len(arr)}"
        raise ValueError(
            f"`{name}` must have one entry per sample id: got {length}, "
            f"but len(sample_ids) is {n}."
        )
    return arr


def _check_batch_size(batch_size: Any, n: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(
            f"`batch_size` must be a positive integer. "
            f"Received: batch_size={batch_size!r} of type {type(batch_size).__name__}"
        )
    if batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer. "
            f"Received: batch_size={batch_size}"
        )
    if batch_size > n:
        raise ValueError(
            f"`batch_size` must be at most the number of samples ({n}, per "
            f"shard when sharded). Received: batch_size={batch_size}"
        )


def _as_seed(seed: Any) -> int:
    if seed is None:
        return secrets.randbits(32)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            f"`seed` must be a non-negative integer or None. "
            f"Received: seed={seed!r} of type {type(seed).__name__}"
        )
    if seed < 0:
        raise ValueError(f"`seed` must be non-negative. Received: seed={seed}")
    return int(seed)

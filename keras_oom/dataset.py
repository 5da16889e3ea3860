"""`LoaderDataset`: a `keras.utils.PyDataset` over a loader and sample ids."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_oom import seeding
from keras_oom.callbacks import TrainingPasses
from keras_oom.protocol import add_note, describe_ids
from keras_oom.source import BatchSource, Targets, as_index, call_loader

Labels = Targets  # an array-like, or a dict / tuple of array-likes


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
            models). A loader that declares a parameter named `rng` is
            called as `loader(ids, rng=rng)`, with a `numpy.random.Generator`
            that is a pure function of `(seed, epoch, batch)`: use it for
            random augmentation (docs/randomness.md). May be omitted when a
            subclass overrides `load`.
        sample_ids: A 1-D array-like of sample ids (ints, strings, paths...),
            passed to the loader in batches.
        labels: Optional labels aligned with `sample_ids`: an array-like of
            the same length, or a dict / tuple of such for multi-output
            models. With labels, `ds[i]` returns `(x, y)`; without, it
            returns what the loader returns.
        sample_weights: Optional per-sample weights aligned with
            `sample_ids`, like `labels` (which they require): `ds[i]` then
            returns `(x, y, sample_weight)`, which `fit` weighs the loss by.
        batch_size: Number of samples per batch. Larger than the data, it
            makes one short batch (an error with `drop_remainder=True`).
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
        ValueError: If `sample_ids` is empty or not 1-D, `labels` or
            `sample_weights` differ in length from `sample_ids`,
            `sample_weights` come without `labels`, `batch_size` is below 1
            (or leaves no batch with `drop_remainder=True`), `shard` is out
            of range, or a shuffled sharded dataset has no `seed`.

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
        loader: Callable[..., Any] | None = None,
        sample_ids: Any = None,
        labels: Labels = None,
        *,
        sample_weights: Labels = None,
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
        self._source = BatchSource(
            sample_ids,
            labels,
            sample_weights,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_remainder=drop_remainder,
            shard=shard,
            shard_mode=shard_mode,
        )
        self._plan = self._source.plan
        self._repeat = bool(repeat)
        self._epoch = 0
        self._passes = TrainingPasses()
        # Read once: the loader (or the subclass's `load`) cannot change.
        self._wants_rng = seeding.accepts_rng(self._batch_loader())

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
            `x`, the loader's return value; `(x, y)` with labels;
            `(x, y, sample_weight)` with sample weights.

        Raises:
            IndexError: If `index` is out of range.
        """
        epoch, batch = self._locate(index)
        ids = self._source.ids(epoch, batch)
        fn = self._batch_loader()
        seed = self._source.seed_of(epoch, batch)
        try:
            x = call_loader(fn, self._wants_rng, ids, seed)
        except Exception as e:
            where = f"batch {self._global_index(epoch, batch)}"
            add_note(e, f"keras_oom: while loading {where}, ids {describe_ids(ids)}")
            raise
        return self._source.with_targets(x, epoch, batch)

    def on_epoch_begin(self) -> None:
        """Notes that Keras begins a pass over the data."""
        self._passes.begin(self)

    def on_epoch_end(self) -> None:
        """Advances to the next epoch's order once per training epoch.

        Keras calls this after every pass over the data: `fit`'s epochs,
        but also once before training (after reading a batch to build the
        model), and around every `evaluate` and `predict`. Only the end of
        a training epoch, or a call from your own loop, advances `epoch`
        (see `keras_oom.callbacks.TrainingPasses`); with `repeat=True` it
        never does, as index `i` already names its epoch.
        """
        if self._passes.end() and not self._repeat:
            self._epoch += 1

    # -- public helpers -----------------------------------------------------

    def load(self, ids: np.ndarray) -> Any:
        """Loads the samples `ids` and returns the batch's inputs `x`.

        Calls the `loader` given at construction. Subclasses may override
        this instead of passing a loader; an override that declares a
        parameter `rng` (`def load(self, ids, rng)`) is called with the
        batch's random generator, as a loader that declares it is.

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
        return self._source.ids(*self._locate(index))

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch whose sample order the batches follow.

        Args:
            epoch: Non-negative epoch number, e.g. to resume a run.
        """
        epoch = as_index(epoch, "epoch")
        if epoch < 0:
            raise ValueError(f"`epoch` must be >= 0. Received: epoch={epoch}")
        self._epoch = epoch
        self._passes.reset()

    @property
    def epoch(self) -> int:
        """The current epoch (advanced by `on_epoch_end`)."""
        return self._epoch

    @property
    def seed(self) -> int:
        """The shuffle seed (drawn at construction when `seed=None`)."""
        return self._source.seed

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
        return self._source.sample_ids

    @property
    def shard(self) -> tuple[int, int]:
        """`(index, count)`: the part of every epoch this dataset reads."""
        return self._plan.shard

    @property
    def shuffle(self) -> bool:
        """Whether every epoch visits the samples in an order of its own."""
        return self._plan.shuffle

    @property
    def drop_remainder(self) -> bool:
        """Whether a last batch smaller than `batch_size` is left out."""
        return self._plan.drop_remainder

    @property
    def repeat(self) -> bool:
        """Whether the dataset is endless (index `i` runs into later epochs)."""
        return self._repeat

    # -- index mapping --------------------------------------------------------

    def _locate(self, index: Any) -> tuple[int, int]:
        """Turns a user index into `(epoch, batch)`, checking its range."""
        i = as_index(index, "index")
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

    def _batch_loader(self) -> Callable[..., Any]:
        """What loads a batch: the `loader`, or a subclass's `load`."""
        if type(self).load is LoaderDataset.load:
            assert self._loader is not None
            return self._loader
        return self.load

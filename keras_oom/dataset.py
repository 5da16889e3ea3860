"""`LoaderDataset`: a `keras.utils.PyDataset` over a loader and sample ids."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_oom import seeding
from keras_oom.protocol import add_note, describe_ids
from keras_oom.source import BatchSource, Targets, as_index, call_loader
from keras_oom.training_passes import TrainingPasses

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
    An epoch is one pass over the data, which is one of Keras's epochs only
    when `fit`'s `steps_per_epoch` is None: training's `g`-th batch is
    batch `g % batches_per_epoch` of epoch `g // batches_per_epoch`, for any
    `steps_per_epoch` (see `on_epoch_end`).

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
            (reshuffled per epoch), and `fit` needs a `steps_per_epoch`
            (`ds.batches_per_epoch`, or any other: Keras's epochs then cut
            one endless stream).
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
        rows_per_id: How many rows the loader returns per id: every array
            in its output must have `len(ids) * rows_per_id` rows (its
            leading dimension). `1` (default) for one row per sample; `k`
            for a loader that returns, e.g., `k` crops of each sample, id by
            id: labels and sample weights are then repeated `k` times per
            id. `None` skips the check (not with `labels`). A batch that
            breaks it raises `ValueError` when the dataset attaches labels
            or weights (they would be paired with the wrong rows), and
            otherwise warns once per dataset.
        **kwargs: `workers`, `use_multiprocessing` and `max_queue_size`,
            passed unchanged to `keras.utils.PyDataset`.

    Raises:
        TypeError: If `loader` is not callable (or is missing without a
            `load` override), or `batch_size` or `rows_per_id` is not an integer.
        ValueError: If `sample_ids` is empty or not 1-D, `labels` or
            `sample_weights` differ in length from `sample_ids`,
            `sample_weights` come without `labels`, `batch_size` is below 1
            (or leaves no batch with `drop_remainder=True`), `shard` is out
            of range, a shuffled sharded dataset has no `seed`, or
            `rows_per_id` is below 1 (or `None` with `labels`).

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
        rows_per_id: int | None = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if loader is None:
            if not self._load_overridden():
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
            rows_per_id=rows_per_id,
        )
        self._plan = self._source.plan
        self._rows_warned = False
        self._repeat = bool(repeat)
        # Index 0 reads batch `_start` of epoch `_epoch`: training's stream
        # position `_epoch * batches_per_epoch + _start` (see `set_epoch`).
        self._epoch = 0
        self._start = 0
        self._passes = TrainingPasses(None if repeat else self._plan.batches_per_epoch)
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
            ValueError: If the dataset attaches labels and an array of the
                loader's output does not have `len(ids) * rows_per_id` rows.
        """
        epoch, batch = self._locate(index)
        self._passes.read(self._global_index(epoch, batch))
        ids = self._source.ids(epoch, batch)
        fn = self._batch_loader()
        seed = self._source.seed_of(epoch, batch)
        try:
            x = call_loader(fn, self._wants_rng, ids, seed)
        except BaseException as e:  # any class, as PrefetchLoaderDataset notes
            where = f"batch {self._global_index(epoch, batch)}"
            add_note(e, f"keras_oom: while loading {where}, ids {describe_ids(ids)}")
            raise
        self._check_rows(x, epoch, batch)
        return self._source.with_targets(x, epoch, batch)

    def on_epoch_begin(self) -> None:
        """Notes that Keras begins a pass over the data."""
        self._passes.begin(self)

    def on_epoch_end(self) -> None:
        """Advances to the next epoch's order once per pass of training.

        An epoch is one pass over the data: every batch once. Keras calls
        this after each of its epochs, which are passes only when
        `steps_per_epoch` is None (or at least `batches_per_epoch`), and
        also once before training (after reading a batch to build the
        model), and around every `evaluate` and `predict`. The epoch
        advances when training has read, and trained on, every batch of the
        current one (so with a smaller `steps_per_epoch`, once per several
        Keras epochs; on TensorFlow, not before Keras trained on what
        tf.data read ahead), when a call comes from your own loop, and,
        when a new `fit` begins, past a pass that the last one left
        unfinished (see `keras_oom.training_passes.TrainingPasses`). With
        `repeat=True` index `i` already names its epoch: only a new `fit`
        moves it on, to the epoch after the last one the previous `fit`
        trained on.
        """
        if not self._passes.end():
            return
        per_epoch = self._plan.batches_per_epoch
        ended_at = self._passes.ended_at
        if self._passes.new_fit and ended_at is not None:
            # The epoch after the last one training read from.
            self._epoch += (self._start + ended_at) // per_epoch + 1
            self._start = 0
        elif not self._repeat:
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

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        """Sets the epoch whose sample order the batches follow.

        With `batch`, index 0 reads batch `batch` of `epoch`, and the
        indices after it the batches after it, into the next epoch once
        this one is exhausted: index `i` is stream position
        `epoch * batches_per_epoch + batch + i`, where position `g` is
        batch `g % batches_per_epoch` of epoch `g // batches_per_epoch`.
        `SyncEpoch` uses it to resume a run whose Keras epochs are shorter
        than a pass (`steps_per_epoch`) in the middle of one.

        Args:
            epoch: Non-negative epoch number, e.g. to resume a run.
            batch: The batch of `epoch` that index 0 reads, in
                `range(batches_per_epoch)`.

        Raises:
            TypeError: If `epoch` or `batch` is not an integer.
            ValueError: If `epoch` is negative or `batch` out of range.
        """
        epoch = as_index(epoch, "epoch")
        if epoch < 0:
            raise ValueError(f"`epoch` must be >= 0. Received: epoch={epoch}")
        batch = as_index(batch, "batch")
        per_epoch = self._plan.batches_per_epoch
        if not 0 <= batch < per_epoch:
            raise ValueError(
                f"`batch` must be in range({per_epoch}), the batches of one "
                f"epoch. Received: batch={batch}"
            )
        self._epoch = epoch
        self._start = batch
        self._passes.reset()

    @property
    def epoch(self) -> int:
        """The current epoch, whose order index 0 reads (advanced by
        `on_epoch_end` once per pass of training)."""
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
    def rows_per_id(self) -> int | None:
        """Rows the loader returns per id (`None`: not checked)."""
        return self._source.rows_per_id

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
        elif not -per_epoch <= i < per_epoch:
            raise IndexError(
                f"Batch index {i} out of range for {per_epoch} batches per epoch."
            )
        else:
            i %= per_epoch
        epoch, batch = divmod(self._start + i, per_epoch)
        return self._epoch + epoch, batch

    def _global_index(self, epoch: int, batch: int) -> int:
        """The index Keras used for `(epoch, batch)`, for messages."""
        per_epoch = self._plan.batches_per_epoch
        return (epoch - self._epoch) * per_epoch + batch - self._start

    def _check_rows(self, x: Any, epoch: int, batch: int) -> None:
        """Raises (labels attached) or warns once unless `x` has a row per id."""
        ids = self._source.ids(epoch, batch)
        problem = self._source.row_mismatch(x, ids, self._global_index(epoch, batch))
        if problem is None:
            return
        if self._source.labels is not None:
            targets = "labels"
            if self._source.sample_weights is not None:
                targets = "labels and sample weights"
            raise ValueError(
                f"{problem} The dataset pairs each id with its {targets}, so "
                f"these rows would be trained on the wrong targets."
            )
        if not self._rows_warned:
            self._rows_warned = True
            warnings.warn(
                f"{problem} Keras will see more or fewer samples than ids (this "
                f"warning is shown once per dataset).",
                UserWarning,
                stacklevel=3,
            )

    def _load_overridden(self) -> bool:
        """Whether a subclass loads batches with its own `load`."""
        return type(self).load is not LoaderDataset.load

    def _batch_loader(self) -> Callable[..., Any]:
        """What loads a batch: the `loader`, or a subclass's `load`."""
        if not self._load_overridden():
            assert self._loader is not None
            return self._loader
        return self.load

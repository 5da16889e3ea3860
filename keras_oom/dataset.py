"""`LoaderDataset`: a `keras.utils.PyDataset` over a loader and sample ids."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_oom import seeding
from keras_oom.checks import as_position, check_loader
from keras_oom.indexing import locate
from keras_oom.source import BatchSource, Targets
from keras_oom.training_passes import TrainingPasses

Labels = Targets  # an array-like, or a dict / tuple of array-likes


class LoaderDataset(keras.utils.PyDataset):
    """A Keras `PyDataset` that loads each batch with a loader function.

    Batch `i` is `loader(batch_ids(i))`, paired with the batch's labels;
    only one batch is in memory at a time, so the data may be far larger
    than RAM. Each epoch (one pass over the data, see `on_epoch_end`)
    visits every sample once (`drop_remainder=True`: all but the last
    `len(sample_ids) % batch_size`); `shuffle=True` shuffles the samples
    anew each epoch, in an order that is a pure function of `(seed, epoch)`.
    The full reference is docs/api.md.

    Args:
        loader: A callable `loader(ids) -> x` that receives a 1-D
            `numpy.ndarray` of one batch's ids and returns its inputs (an
            array, or a tuple / dict of arrays for multi-input models). One
            that declares a parameter `rng` is called as
            `loader(ids, rng=rng)` with a `numpy.random.Generator` that is a
            pure function of `(seed, epoch, batch)`, for random augmentation
            (docs/randomness.md). May be omitted when a subclass overrides
            `load`.
        sample_ids: A 1-D array-like of sample ids (ints, strings, paths...),
            passed to the loader in batches.
        labels: Optional labels aligned with `sample_ids`: an array-like of
            the same length, or a dict / tuple of such for multi-output
            models. With labels `ds[i]` returns `(x, y)`, else `x`.
        sample_weights: Optional per-sample weights aligned like `labels`
            (which they require): `ds[i]` then returns
            `(x, y, sample_weight)`, which `fit` weighs the loss by.
        batch_size: Number of samples per batch. Larger than the data, it
            makes one short batch (an error with `drop_remainder=True`).
        shuffle: Whether to shuffle the samples anew in each epoch.
        seed: Seed of the shuffle. `None` draws one at construction, kept in
            `ds.seed`.
        drop_remainder: Whether to drop the last batch when it is smaller
            than `batch_size`.
        repeat: Whether to loop over the data endlessly: `num_batches` is
            then `None`, index `i` is batch `i % batches_per_epoch` of epoch
            `epoch + i // batches_per_epoch`, and `fit` needs a
            `steps_per_epoch` (e.g. `ds.batches_per_epoch`).
        shard: For data-parallel training: `(index, count)` reads only part
            `index` of `count` disjoint parts of every epoch (every
            `count`-th sample of its order), with as many batches in every
            process. `"auto"` takes them from the running distribution
            (`jax.process_index()` / `jax.process_count()`, TensorFlow's
            multi-worker strategies); a no-op in one process. With
            `shuffle=True` every process must pass the same `seed`.
        shard_mode: How shards are made equal when `count` does not divide
            `len(sample_ids)`: `"pad"` (default) repeats the first samples
            of the epoch's order (seen twice that epoch); `"drop"` leaves its
            last `len(sample_ids) % count` out (others each epoch if shuffled).
        rows_per_id: Rows the loader returns per id: every array it returns
            must have `len(ids) * rows_per_id` rows. `k > 1` for, e.g., `k`
            crops of each sample, id by id (labels and sample weights are
            repeated `k` times per id); `None` skips the check (not with
            `labels`). A batch that breaks it raises `ValueError` when the
            dataset attaches labels or weights, and otherwise warns once.
        **kwargs: `workers`, `use_multiprocessing` and `max_queue_size`,
            passed unchanged to `keras.utils.PyDataset`.

    Raises:
        TypeError: If `loader` is not callable (or missing without a `load`
            override), or `batch_size`, `seed` or `rows_per_id` is not an
            integer.
        ValueError: If `sample_ids` is empty or not 1-D, `labels` or
            `sample_weights` differ in length from it, `sample_weights` come
            without `labels`, `batch_size` is below 1 (or leaves no batch
            with `drop_remainder=True`), `shard` is out of range, a shuffled
            sharded dataset has no `seed`, or `rows_per_id` is below 1 (or
            `None` with `labels`).

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
        check_loader(loader, self._load_overridden())
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
        i = self._global_index(epoch, batch)
        self._passes.read(i)
        x = self._source.load(self._batch_loader(), self._wants_rng, epoch, batch, i)
        self._check_rows(x, epoch, batch)
        return self._source.with_targets(x, epoch, batch)

    def on_epoch_begin(self) -> None:
        """Notes that Keras begins a pass over the data."""
        self._passes.begin(self)

    def on_epoch_end(self) -> None:
        """Advances to the next epoch's order once per pass of training.

        Keras also calls this before training and around `evaluate` and
        `predict`: the epoch advances only once training has read, and
        trained on, every batch of it (after several Keras epochs with a
        smaller `steps_per_epoch`), on a call from your own loop, and past a
        pass the last `fit` left unfinished (`keras_oom.training_passes`;
        docs/api.md). With `repeat=True` only a new `fit` moves it.
        """
        if not self._passes.end():
            return
        ended_at = self._passes.ended_at
        if self._passes.new_fit and ended_at is not None:
            # The epoch after the last one training read from.
            self._epoch += (self._start + ended_at) // self.batches_per_epoch + 1
            self._start = 0
        elif not self._repeat:
            self._epoch += 1

    # -- public helpers -----------------------------------------------------

    def load(self, ids: np.ndarray) -> Any:
        """Loads the samples `ids` and returns the batch's inputs `x`.

        Calls the `loader`. A subclass may override it instead of passing a
        loader; an override that declares `rng` (`def load(self, ids, rng)`)
        gets the batch's random generator, as such a loader does.

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

        Index 0 then reads batch `batch` of `epoch`, and the indices after it
        the batches after it, into the next epoch (`indexing.locate`):
        `SyncEpoch` resumes a run in the middle of a pass this way.

        Args:
            epoch: Non-negative epoch number, e.g. to resume a run.
            batch: The batch of `epoch` that index 0 reads, in
                `range(batches_per_epoch)`.

        Raises:
            TypeError: If `epoch` or `batch` is not an integer.
            ValueError: If `epoch` is negative or `batch` out of range.
        """
        self._epoch, self._start = as_position(epoch, batch, self.batches_per_epoch)
        self._passes.reset()

    @property
    def epoch(self) -> int:
        """The epoch index 0 reads from; `on_epoch_end` advances it per pass."""
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
        per_epoch = self._plan.batches_per_epoch
        return locate(index, self._epoch, self._start, per_epoch, self._repeat)

    def _global_index(self, epoch: int, batch: int) -> int:
        """The index Keras used for `(epoch, batch)`, for messages."""
        return (epoch - self._epoch) * self.batches_per_epoch + batch - self._start

    def _check_rows(self, x: Any, epoch: int, batch: int) -> None:
        """Raises (labels attached) or warns once unless `x` has a row per id."""
        index = self._global_index(epoch, batch)
        problem = self._source.check_rows(x, epoch, batch, index)
        if problem is not None and not self._rows_warned:
            self._rows_warned = True
            warnings.warn(problem, UserWarning, stacklevel=3)

    def _load_overridden(self) -> bool:
        """Whether a subclass loads batches with its own `load`."""
        return type(self).load is not LoaderDataset.load

    def _batch_loader(self) -> Callable[..., Any]:
        """What loads a batch: the `loader`, or a subclass's `load`."""
        if self._load_overridden() or self._loader is None:
            return self.load
        return self._loader

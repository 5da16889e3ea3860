"""`BatchSource`: what batch `(epoch, batch)` is made of, checked once.

Both dataset classes hold one `BatchSource`: the sample ids, the labels and
sample weights aligned with them, the batch plan (`indexing.py`), and how
the loader is called. Every constructor argument they share is validated
here, so a new option is added in one place. A stripped copy
(`for_workers`) is what worker processes receive.

This module runs in workers too: it imports neither Keras nor a backend.
"""

from __future__ import annotations

import reprlib
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from keras_oom import seeding
from keras_oom.checks import as_index
from keras_oom.indexing import BatchPlan, shard_size
from keras_oom.protocol import add_note, describe_ids
from keras_oom.sharding import resolve_shard

Targets = Any  # an array-like, or a dict / tuple of array-likes


class BatchSource:
    """The validated, immutable description of every batch of every epoch.

    Args: as the same-named arguments of `LoaderDataset`.

    Raises:
        TypeError, ValueError: For a bad argument, naming it and its value.
    """

    def __init__(
        self,
        sample_ids: Any,
        labels: Targets = None,
        sample_weights: Targets = None,
        *,
        batch_size: Any = 32,
        shuffle: bool = False,
        seed: Any = None,
        drop_remainder: bool = False,
        shard: Any = None,
        shard_mode: str = "pad",
        rows_per_id: Any = 1,
    ) -> None:
        self.sample_ids = _as_sample_ids(sample_ids)
        n = len(self.sample_ids)
        self.labels = _as_targets(labels, n, "labels")
        if sample_weights is not None and self.labels is None:
            raise ValueError(
                "`sample_weights` needs `labels`: Keras reads a batch as "
                "(x, y, sample_weight). Received: labels=None"
            )
        self.sample_weights = _as_targets(sample_weights, n, "sample_weights")
        self.rows_per_id = _as_rows_per_id(rows_per_id, self.labels is not None)
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
        _check_batch_size(batch_size, per_shard, bool(drop_remainder))
        self.seed = _as_seed(seed)
        self.plan = BatchPlan(
            n,
            int(batch_size),
            shuffle=bool(shuffle),
            seed=self.seed,
            drop_remainder=bool(drop_remainder),
            shard=(shard_index, shard_count),
            shard_mode=shard_mode,
        )

    def ids(self, epoch: int, batch: int) -> np.ndarray:
        """The sample ids of batch `batch` of `epoch`."""
        return self.sample_ids[self.plan.positions(epoch, batch)]

    def seed_of(self, epoch: int, batch: int) -> tuple[int, int, int]:
        """`(seed, epoch, position)`, from which the batch's randomness derives.

        The position is the batch's place in the whole, unsharded epoch, so
        every shard's batches draw their own streams.
        """
        return self.seed, epoch, seeding.batch_position(batch, self.plan.shard)

    def load(
        self,
        loader: Callable[..., Any],
        wants_rng: bool,
        epoch: int,
        batch: int,
        index: int,
    ) -> Any:
        """Loads batch `batch` of `epoch` in this process with `loader`.

        Args:
            loader: The loader, or a subclass's `load`.
            wants_rng: Whether it declares `rng` (`seeding.accepts_rng`).
            epoch: The batch's epoch.
            batch: The batch within the epoch.
            index: The batch index the caller asked for, for the note.

        Returns:
            What the loader returned.

        Raises:
            BaseException: Whatever the loader raised, of any class (as
                `PrefetchLoaderDataset` raises it), with a note naming the
                batch and its ids.
        """
        ids = self.ids(epoch, batch)
        try:
            return call_loader(loader, wants_rng, ids, self.seed_of(epoch, batch))
        except BaseException as e:
            add_note(
                e, f"keras_oom: while loading batch {index}, ids {describe_ids(ids)}"
            )
            raise

    def with_targets(self, x: Any, epoch: int, batch: int) -> Any:
        """`x`, or `(x, y)` with labels, or `(x, y, w)` with sample weights.

        With `rows_per_id > 1` each id's labels and weights are repeated for
        each of its rows (`np.repeat`), as the loader returns them id by id.
        """
        if self.labels is None:
            return x
        pos = self.plan.positions(epoch, batch)
        if self.rows_per_id is not None and self.rows_per_id > 1:
            pos = np.repeat(pos, self.rows_per_id)
        y = _take(self.labels, pos)
        if self.sample_weights is None:
            return x, y
        return x, y, _take(self.sample_weights, pos)

    def row_mismatch(self, x: Any, ids: np.ndarray, index: int) -> str | None:
        """Describes the first array in `x` without one row per id, or None.

        Every leaf of `x` (through dicts, lists and tuples) that has a
        `shape` must have `len(ids) * rows_per_id` rows; a 0-d array has
        none. `rows_per_id=None` skips the check.

        Args:
            x: What the loader returned for the batch.
            ids: The batch's sample ids.
            index: The batch index the caller asked for, for the message.

        Returns:
            A message naming the batch, its ids, the leaf and its shape, or
            None when every leaf is right.
        """
        if self.rows_per_id is None:
            return None
        expected = len(ids) * self.rows_per_id
        for path, shape in _array_leaves(x, "x"):
            if shape and (shape[0] is None or shape[0] == expected):
                continue
            got = "a 0-d array" if not shape else f"{shape[0]} rows"
            per_id = "" if self.rows_per_id == 1 else f" x {self.rows_per_id}"
            return (
                f"The loader returned {got} in {path} (shape {shape}) for "
                f"batch {index}, ids {describe_ids(ids)}: {len(ids)} ids"
                f"{per_id}, so every array must have {expected} rows. A loader "
                f"that returns several rows per id on purpose says so with "
                f"`rows_per_id=k` (or `rows_per_id=None` to skip this check)."
            )
        return None

    def check_rows(self, x: Any, epoch: int, batch: int, index: int) -> str | None:
        """Checks that `x` has one row per id (`rows_per_id`) for the batch.

        A mismatch is an error when labels or sample weights are attached
        (they would be paired with the wrong rows), and otherwise only
        worth a warning, which the dataset gives once.

        Args:
            x: What the loader returned for batch `batch` of `epoch`.
            epoch: The batch's epoch.
            batch: The batch within the epoch.
            index: The batch index the caller asked for, for the message.

        Returns:
            None when every array is right; otherwise the warning to give.

        Raises:
            ValueError: If an array is wrong and the dataset has labels.
        """
        problem = self.row_mismatch(x, self.ids(epoch, batch), index)
        if problem is None:
            return None
        if self.labels is not None:
            targets = "labels"
            if self.sample_weights is not None:
                targets = "labels and sample weights"
            raise ValueError(
                f"{problem} The dataset pairs each id with its {targets}, so "
                f"these rows would be trained on the wrong targets."
            )
        return (
            f"{problem} Keras will see more or fewer samples than ids (this "
            f"warning is shown once per dataset)."
        )

    def for_workers(self) -> BatchSource:
        """A copy without the ids, labels and weights, which workers never read.

        A subclass's `load` runs in workers on a copy of the dataset; this
        keeps a large label array (or millions of paths) from being pickled
        into every worker.
        """
        stripped = object.__new__(BatchSource)
        stripped.__dict__.update(self.__dict__)
        stripped.sample_ids = self.sample_ids[:0]
        stripped.labels = stripped.sample_weights = None
        return stripped


def call_loader(
    loader: Callable[..., Any], wants_rng: bool, ids: Any, seed: tuple[int, int, int]
) -> Any:
    """Calls `loader(ids)`, or `loader(ids, rng=...)` when it declares `rng`."""
    if wants_rng:
        return loader(ids, rng=seeding.batch_rng(*seed))
    return loader(ids)


def _array_leaves(x: Any, path: str) -> Iterator[tuple[str, tuple]]:
    """`(path, shape)` of every leaf of `x` that has a shape, depth first."""
    if isinstance(x, Mapping):
        for k, v in x.items():
            yield from _array_leaves(v, f"{path}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _array_leaves(v, f"{path}[{i}]")
    else:
        shape = getattr(x, "shape", None)
        if shape is not None:
            try:
                yield path, tuple(shape)
            except TypeError:  # a `shape` that is not a sequence
                return


def _take(targets: Any, pos: np.ndarray) -> Any:
    if isinstance(targets, dict):
        return {k: v[pos] for k, v in targets.items()}
    if isinstance(targets, tuple):
        return tuple(v[pos] for v in targets)
    return targets[pos]


def _as_sample_ids(sample_ids: Any) -> np.ndarray:
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


def _as_targets(targets: Targets, n: int, name: str) -> Any:
    if targets is None:
        return None
    if isinstance(targets, Mapping):
        return {k: _as_aligned(v, n, f"{name}[{k!r}]") for k, v in targets.items()}
    if isinstance(targets, tuple):
        return tuple(_as_aligned(v, n, f"{name}[{i}]") for i, v in enumerate(targets))
    return _as_aligned(targets, n, name)


def _as_aligned(values: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 0 or len(arr) != n:
        length = "a scalar" if arr.ndim == 0 else f"length {len(arr)}"
        raise ValueError(
            f"`{name}` must have one entry per sample id: got {length}, "
            f"but len(sample_ids) is {n}."
        )
    return arr


_POSITIVE = "a positive integer"


def _check_batch_size(batch_size: Any, n: int, drop_remainder: bool) -> None:
    batch_size = as_index(batch_size, "batch_size", minimum=1, what=_POSITIVE)
    if batch_size > n and drop_remainder:
        raise ValueError(
            f"`drop_remainder=True` with `batch_size` larger than the number "
            f"of samples ({n}, per shard when sharded) leaves no batch. "
            f"Received: batch_size={batch_size}"
        )


def _as_rows_per_id(rows_per_id: Any, has_targets: bool) -> int | None:
    if rows_per_id is None:
        if has_targets:
            raise ValueError(
                "`rows_per_id=None` leaves the loader's rows unchecked, so the "
                "labels (and sample weights) that the dataset attaches one per "
                "id could be paired with the wrong rows. Give `rows_per_id=k`, "
                "or return (x, y) from the loader. Received: rows_per_id=None "
                "with labels"
            )
        return None
    return as_index(
        rows_per_id, "rows_per_id", minimum=1, what="a positive integer or None"
    )


def _as_seed(seed: Any) -> int:
    if seed is None:
        return secrets.randbits(32)
    return as_index(seed, "seed", minimum=0, what="a non-negative integer or None")

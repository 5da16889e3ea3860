"""Following Keras's epochs: the `SyncEpoch` callback and `TrainingPasses`.

A dataset's epoch is one pass over its batches, which is not always one of
Keras's epochs (`steps_per_epoch`). `TrainingPasses` lets a dataset tell,
from inside its `on_epoch_begin` / `on_epoch_end` and its reads, which of
Keras's calls end a pass of training, so that its epoch advances once per
pass. `SyncEpoch` places datasets where an uninterrupted run is, as a
`fit` begins, so that a resumed run reads the same batches.

Kept apart from the package's top level because it imports Keras, which
worker processes must never do.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import warnings
import weakref
from types import FrameType
from typing import Any

import keras


class SyncEpoch(keras.callbacks.Callback):
    """Puts datasets where an uninterrupted run is, as a `fit` begins.

    A dataset's order and randomness are functions of `(seed, epoch)`, and
    its epoch counts passes over the data from when the dataset was built,
    so a run resumed in a new process (whose dataset starts at epoch 0)
    would not see the same data. With this callback it does:
    `fit(..., initial_epoch=k)` and `keras.callbacks.BackupAndRestore`
    resume on exactly the same batches, in the same order, with the same
    `rng` draws as the uninterrupted run.

    - The dataset `fit` trains on is placed once, as the fit's first epoch
      `k` begins, where training of an uninterrupted run (from epoch 0,
      with the same `steps_per_epoch`) is at Keras epoch `k`: epoch `k`
      when a Keras epoch is a pass (`steps_per_epoch` None or at least
      `batches_per_epoch`); otherwise the batch Keras epoch `k` starts at,
      `(epoch, batch)` in the stream where training's `g`-th batch is batch
      `g % B` of epoch `g // B` (`ds.set_epoch(epoch, batch)`). From there
      the dataset follows Keras's passes itself.
    - Every other dataset (a validation dataset, whose augmentation should
      follow the epoch too) is set to epoch `k` as every Keras epoch `k`
      begins: `evaluate` reads it from its first batch each time.

    A resume is exact whenever Keras cuts the stream the same way in the
    resumed run: always with `repeat=True`, and with
    `steps_per_epoch=None`; with a finite dataset and a smaller
    `steps_per_epoch`, when the Keras epoch resumed at begins a pass or
    the batches of a Keras epoch divide `batches_per_epoch`. Otherwise
    Keras itself cuts the resumed passes into other Keras epochs (its last
    epoch of each pass is short): `SyncEpoch` warns, and the resumed run
    still goes on from the same batch.

    Keras calls `on_epoch_begin` before it requests the epoch's first batch,
    so a `PrefetchLoaderDataset` discards at most the batches it had loaded
    ahead for another place.

    Args:
        *datasets: One or more datasets with a `set_epoch(int)` method, such
            as `LoaderDataset` and `PrefetchLoaderDataset`: usually the
            training dataset, plus a validation dataset whose augmentation
            should follow the epoch too. Which one `fit` trains on is told
            apart by the dataset (a dataset of another class is set to
            Keras's epoch index at every epoch, or only at the first one
            when its `repeat` attribute is true).

    Raises:
        TypeError: If no dataset is given, or an argument has no callable
            `set_epoch`.

    Example:

    ```python
    import keras
    import numpy as np
    from keras_oom import LoaderDataset, SyncEpoch

    ids = np.arange(32)
    train = LoaderDataset(lambda ids: ids[:, None] / 32.0, ids, ids % 2 * 1.0,
                          batch_size=8, shuffle=True, seed=0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")

    # Epochs 2 and 3 read the same batches as in a run started at epoch 0.
    model.fit(train, epochs=4, initial_epoch=2, shuffle=False, verbose=0,
              callbacks=[SyncEpoch(train)])
    assert train.epoch == 4

    # Resume after a crash: BackupAndRestore restores the weights and
    # Keras's epoch index; SyncEpoch puts the dataset on the same batches.
    # model.fit(train, epochs=10, shuffle=False, callbacks=[
    #     keras.callbacks.BackupAndRestore(backup_dir="/tmp/backup"),
    #     SyncEpoch(train),
    # ])
    ```
    """

    def __init__(self, *datasets: Any) -> None:
        super().__init__()
        if not datasets:
            raise TypeError(
                "SyncEpoch needs at least one dataset with a `set_epoch` "
                "method, as SyncEpoch(train_ds). Received: no arguments"
            )
        for i, ds in enumerate(datasets):
            if not callable(getattr(ds, "set_epoch", None)):
                raise TypeError(
                    f"Every argument of SyncEpoch must have a `set_epoch(epoch)` "
                    f"method, as LoaderDataset does. Received: datasets[{i}]="
                    f"{_short_repr(ds)} of type {type(ds).__name__}"
                )
        self.datasets = tuple(datasets)
        self._first_epoch = True  # of the current fit
        self._training: set[int] = set()  # ids of the datasets fit trains on

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._first_epoch = True
        self._training = {id(ds) for ds in self.datasets if trained_by_this_fit(ds)}

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Places the training dataset (first epoch), sets the others.

        An endless dataset (`repeat=True`) of another class is set only as
        the first epoch of a `fit` begins: Keras then keeps reading one
        iterator through all epochs, so a later reset would skip ahead.
        """
        first = self._first_epoch
        self._first_epoch = False
        for ds in self.datasets:
            if id(ds) in self._training:
                if first:
                    self._place(ds, epoch)
                continue
            # Read from its first batch by each evaluate; but an endless
            # dataset of another class may be fit's, read by one iterator.
            ours = isinstance(getattr(ds, "_passes", None), TrainingPasses)
            if ours or first or not getattr(ds, "repeat", False):
                ds.set_epoch(epoch)

    def _place(self, ds: Any, keras_epoch: int) -> None:
        """Sets `ds` where training of an uninterrupted run is at `keras_epoch`."""
        per_epoch = ds.batches_per_epoch
        steps = (self.params or {}).get("steps")
        per_execution = getattr(self.model, "steps_per_execution", 1) or 1
        if not steps:
            ds.set_epoch(keras_epoch)
            return
        # Keras reads whole executions: ceil(steps / spe) of spe batches.
        per_keras_epoch = math.ceil(steps / per_execution) * per_execution
        if ds.repeat:  # one iterator for the whole fit: a plain stream
            epoch, batch = divmod(keras_epoch * per_keras_epoch, per_epoch)
        elif per_keras_epoch >= per_epoch:  # a Keras epoch is a pass
            epoch, batch = keras_epoch, 0
        else:
            # Keras epochs per pass: the last one reads what is left.
            per_pass = math.ceil(per_epoch / per_keras_epoch)
            epoch, part = divmod(keras_epoch, per_pass)
            batch = part * per_keras_epoch
            if part and per_epoch % per_keras_epoch:
                warnings.warn(
                    f"SyncEpoch cannot resume at Keras epoch {keras_epoch} on "
                    f"exactly the batches of an uninterrupted run: with "
                    f"steps_per_epoch={steps}, Keras cuts each pass of "
                    f"{per_epoch} batches into Keras epochs of "
                    f"{per_keras_epoch} (the last one shorter), and a run "
                    f"resumed mid-pass is cut in other places. It goes on "
                    f"from batch {batch} of epoch {epoch}, where the "
                    f"uninterrupted run was; for an exact resume build the "
                    f"dataset with repeat=True (Keras epochs then cut one "
                    f"endless stream), or use a steps_per_epoch that divides "
                    f"{per_epoch}.",
                    UserWarning,
                    stacklevel=2,
                )
        if batch:
            ds.set_epoch(epoch, batch)
        else:
            ds.set_epoch(epoch)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Keras methods whose calls are never training's: the build peek
# (`_symbolic_build`, TensorFlow's `_maybe_symbolic_build`), TensorFlow's
# shape peek at batches 0 and 1 (`get_tf_dataset`, also when fit builds its
# validation iterator), evaluate (also fit's validation) and predict.
_BUILD = frozenset({"_symbolic_build", "_maybe_symbolic_build", "get_tf_dataset"})
_OTHER_PASSES = frozenset({"evaluate", "predict"})
_NOT_TRAINING = _BUILD | _OTHER_PASSES


class TrainingPasses:
    """Tells which of Keras's `on_epoch_end` calls end a pass of training.

    A dataset's epoch is one *pass* over its batches: training's `g`-th
    batch is batch `g % B` of epoch `g // B` (`B` batches per epoch). Keras's
    epochs are not passes: with `steps_per_epoch` below `B`, `fit` goes on
    reading the same iterator in its next epoch, and starts a new pass only
    once the iterator has yielded all `B` batches (several Keras epochs per
    pass, the last one possibly short); and Keras calls `on_epoch_end` more
    often than it ends passes: `fit` calls it once before its first epoch
    (its iterator's `reset()`), after a one-batch peek to build the model on
    JAX and torch; `evaluate` before and after reading; `predict` after.

    A dataset calls `begin()` from `on_epoch_begin`, `read(index)` for every
    batch it hands out, and advances its epoch when `end()`, called from
    `on_epoch_end`, returns True. `end()` is True when:

    - it comes from the end of one of `fit`'s epochs and the pass is
      complete: every index `0..B-1` was read by training since the pass
      began, and Keras has consumed them: its epochs since the pass began,
      of `ceil(steps_per_epoch / steps_per_execution) * steps_per_execution`
      batches each, hold `B` batches (reads from `evaluate`, `predict` and
      the build and shape peeks do not count);
    - it comes from `fit`'s `reset()`, before the first epoch of a new fit,
      and training read part of a pass that did not end (`steps_per_epoch`,
      `stop_training` or an error cut it): the next fit starts a new pass
      (`new_fit` is then True and `ended_at` is the last index training
      consumed, when Keras's epochs tell it, else the furthest index read);
    - or it comes from outside Keras's `fit`, `evaluate`, `predict` and
      build code (a hand-written loop, a custom trainer): advancing too
      often keeps the data shuffled, never advancing would freeze it.

    A dataset that never calls `read()` (a subclass overriding
    `__getitem__` without calling the base class), or an endless one
    (`batches_per_epoch=None`), has no complete passes: for the former
    every end of a `fit` epoch that began counts, as before; for the
    latter none does, as its index already names the epoch.

    Reads and consumption differ on TensorFlow: Keras wraps the dataset in
    `tf.data.Dataset.from_generator(...).prefetch(AUTOTUNE)`, whose thread
    reads batches before the training step takes them, while Keras's hooks
    run on its own thread; at the end of a `fit` the batches read ahead are
    dropped with the iterator. So a read is attributed to training by the
    Keras generator that makes it (`PyDatasetAdapter._finite_generator` /
    `_infinite_generator`, whichever thread runs it): training's is the
    adapter of the `EpochIterator` whose `on_epoch_begin` came from `fit`.
    And a pass ends when Keras's epochs have consumed it, not when it was
    read. On JAX and torch reads are consumption (Keras's thread reads as it
    trains), and both rules give the same answer.

    Which Keras method is calling is read from the Python stack: the
    innermost frame of Keras's own `fit`, `evaluate`, `predict` or build
    code, and whether an `EpochIterator.reset` frame lies within it. The
    hooks run on the trainer's thread in Keras 3 (verified on 3.15 for all
    three backends).

    Args:
        batches_per_epoch: `B`, the batches of one pass, or `None` for a
            dataset whose passes never end within a fit (`repeat=True`).
    """

    def __init__(self, batches_per_epoch: int | None = None) -> None:
        self.batches_per_epoch = batches_per_epoch
        self._lock = threading.Lock()
        self._training = False  # a fit epoch began on this pass, not ended
        self._read: set[int] = set()
        self._furthest: int | None = None
        self._reads_reported = False  # read() was ever called
        self._in_other_pass = False  # between evaluate/predict begin and end
        self.new_fit = False
        self.ended_at: int | None = None
        self.fit_stamp = 0  # which fit's reset() came last: see SyncEpoch
        self._checked_fit: int | None = None  # id() of the last fit frame seen
        self._warned = False  # warn_if_resume_differs: once per dataset
        # What the running fit's EpochIterator says (see `_fit_iterator`):
        # its adapter, whose generator makes training's reads, and how many
        # batches each of its Keras epochs consumes (None: not known).
        self._adapter: weakref.ref | None = None
        self._per_keras_epoch: int | None = None
        self._keras_epochs = 0  # fit epochs ended since the pass began
        self._in_keras_epoch = False  # a fit epoch began and did not end

    def begin(self, dataset: Any = None) -> None:
        """Call from the dataset's `on_epoch_begin`, with the dataset.

        At the first training epoch of each `fit`, checks once whether a
        resumed run would read other data (`warn_if_resume_differs`).
        """
        caller, _ = _keras_caller(sys._getframe(1))
        adapter, per_keras_epoch = None, None
        if caller == "fit":
            adapter, per_keras_epoch = _fit_iterator(
                sys._getframe(1), self.batches_per_epoch
            )
        with self._lock:
            if caller == "fit":
                self._training = True
                self._in_other_pass = False
                self._in_keras_epoch = True
                self._adapter = adapter
                self._per_keras_epoch = per_keras_epoch
            elif caller in _OTHER_PASSES:
                self._in_other_pass = True
        if caller != "fit" or self._warned or dataset is None:
            return
        frame = _keras_frame(sys._getframe(1))
        if frame is not None and id(frame) != self._checked_fit:
            self._checked_fit = id(frame)
            self._warned = warn_if_resume_differs(dataset, frame)

    def read(self, index: int) -> None:
        """Call for every batch handed out, with its index in the pass."""
        caller, _ = _keras_caller(sys._getframe(1))
        if caller in _NOT_TRAINING:
            return
        reader = _reading_adapter(sys._getframe(1))
        with self._lock:
            self._reads_reported = True
            if not self._training:
                return
            training = self._adapter() if self._adapter is not None else None
            if reader is not None and training is not None:
                if reader is not training:  # evaluate's, predict's, another fit's
                    return
            elif caller is None and self._in_other_pass:
                return
            if self.batches_per_epoch is not None:
                self._read.add(index)
            if self._furthest is None or index > self._furthest:
                self._furthest = index

    def end(self) -> bool:
        """Call from the dataset's `on_epoch_end`; True: a pass has ended."""
        caller, via_reset = _keras_caller(sys._getframe(1))
        with self._lock:
            self.new_fit, self.ended_at = False, None
            if caller in _OTHER_PASSES:
                self._in_other_pass = False
                return False
            if caller in _BUILD:
                return False
            if caller != "fit":
                return self._finish()
            if via_reset:
                self.fit_stamp = _FIT_STAMPS.next()
                unfinished = self._training and (
                    not self._reads_reported or self._furthest is not None
                )
                if not unfinished:
                    return False
                self.new_fit = True
                self._furthest = self._last_consumed()
                return self._finish()
            if not self._training:
                return False
            if self._in_keras_epoch:
                self._in_keras_epoch = False
                self._keras_epochs += 1
            if not self._reads_reported or self._complete():
                return self._finish()
            return False

    def reset(self) -> None:
        """Forgets the current pass, e.g. after `set_epoch`."""
        with self._lock:
            self._training = False
            self._read.clear()
            self._furthest = None
            self._keras_epochs = 0
            self._in_keras_epoch = False

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_adapter"] = None  # a weak reference does not pickle
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _complete(self) -> bool:
        """Training read every batch of the pass, and Keras consumed them."""
        n = self.batches_per_epoch
        if n is None or len(self._read) < n:
            return False
        per = self._per_keras_epoch
        return per is None or self._keras_epochs * per >= n

    def _last_consumed(self) -> int | None:
        """The furthest index training consumed in this pass: the furthest
        read, but no further than Keras's ended epochs reached (tf.data read
        the rest ahead). Not known within an epoch that did not end."""
        furthest, per = self._furthest, self._per_keras_epoch
        if furthest is None or per is None or self._in_keras_epoch:
            return furthest
        consumed = self._keras_epochs * per
        return furthest if consumed < 1 else min(furthest, consumed - 1)

    def _finish(self) -> bool:
        self.ended_at = self._furthest
        self._training = False
        self._read.clear()
        self._furthest = None
        self._keras_epochs = 0
        self._in_keras_epoch = False
        return True


class _Stamps:
    """Numbers every `fit`'s `reset()` seen by a dataset, the latest last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latest = 0

    def next(self) -> int:
        with self._lock:
            self.latest += 1
            return self.latest


_FIT_STAMPS = _Stamps()


def trained_by_this_fit(ds: Any) -> bool:
    """Whether `ds` is what the running `fit` trains on.

    `fit` ends a pass of its training dataset (its iterator's `reset()`)
    just before `on_train_begin`, so that dataset holds the latest stamp.
    False for a dataset without `TrainingPasses` (it cannot tell).
    """
    passes = getattr(ds, "_passes", None)
    return (
        isinstance(passes, TrainingPasses)
        and passes.fit_stamp != 0
        and passes.fit_stamp == _FIT_STAMPS.latest
    )


_KERAS_DIR = os.path.dirname(os.path.abspath(keras.__file__))
_KNOWN = _NOT_TRAINING | {"fit"}


def _keras_caller(frame: FrameType | None) -> tuple[str | None, bool]:
    """The innermost of Keras's own fit / evaluate / predict / build frames,
    and whether an `EpochIterator.reset` frame lies between it and `frame`.

    Frames are told by their code's name and file, not by `f_locals`:
    reading a frame's locals makes Python keep a snapshot of them on the
    frame, which would keep the caller's batches (shared memory) alive.
    """
    via_reset = False
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(_KERAS_DIR):
            if code.co_name in _KNOWN:
                return code.co_name, via_reset
            if code.co_name == "reset" and code.co_filename.endswith(
                "epoch_iterator.py"
            ):
                via_reset = True
        frame = frame.f_back
    return None, False


_GENERATORS = frozenset({"_finite_generator", "_infinite_generator"})


def _fit_iterator(
    frame: FrameType | None, per_epoch: int | None
) -> tuple[weakref.ref | None, int | None]:
    """The running fit's training adapter (a weak reference) and the batches
    each of its Keras epochs consumes, from the `EpochIterator` whose
    `on_epoch_begin` is calling; `(None, None)` where Keras is not.

    Reads the `_enumerate_iterator` frame's `self`: its only local bound
    when it calls `on_epoch_begin`, so the snapshot of locals that reading
    leaves on the frame keeps no batch alive.
    """
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_enumerate_iterator" and code.co_filename.startswith(
            _KERAS_DIR
        ):
            iterator: Any = frame.f_locals.get("self")
            try:
                adapter = weakref.ref(iterator.data_adapter)
                spe = int(iterator.steps_per_execution or 1)
                steps = iterator.steps_per_epoch
            except (AttributeError, TypeError, ValueError):
                return None, None
            if not steps:  # a Keras epoch is a pass (or endless: not known)
                return adapter, per_epoch
            # Keras reads whole executions: ceil(steps / spe) of spe batches.
            return adapter, math.ceil(int(steps) / spe) * spe
        frame = frame.f_back
    return None, None


def _reading_adapter(frame: FrameType | None) -> Any:
    """The `PyDatasetAdapter` whose generator is reading, or None.

    Keras's own generators (`_finite_generator`, `_infinite_generator`) read
    the dataset on whatever thread runs them: Keras's on JAX and torch,
    tf.data's on TensorFlow. Their locals are `self`, the indices and the
    index, never a batch, so reading them keeps nothing alive.
    """
    while frame is not None:
        code = frame.f_code
        if code.co_name in _GENERATORS and code.co_filename.startswith(_KERAS_DIR):
            return frame.f_locals.get("self")
        frame = frame.f_back
    return None


def _keras_frame(frame: FrameType | None) -> FrameType | None:
    """The innermost of Keras's own fit / evaluate / predict / build frames.

    Frames are told by their code's name and file, not by `f_locals`:
    reading a frame's locals makes Python keep a snapshot of them on the
    frame, which would keep the caller's batches (shared memory) alive.
    """
    while frame is not None:
        code = frame.f_code
        if code.co_name in _KNOWN and code.co_filename.startswith(_KERAS_DIR):
            return frame
        frame = frame.f_back
    return None


def warn_if_resume_differs(dataset: Any, fit_frame: FrameType) -> bool:
    """Warns when this `fit` resumes a run on other data than it had.

    A dataset's order and randomness follow its own epoch count, which a
    new process starts at 0. Without `SyncEpoch`, a run resumed by
    `BackupAndRestore`, or started at Keras epoch `k` while the dataset is
    at another epoch, reads other batches than the uninterrupted run did.

    Called once per `fit`, as its first training epoch begins. It reads
    `fit`'s local variables (`callbacks`, `epoch`): the one read of
    `f_locals`, at a point where they hold no batch, so the snapshot it
    leaves keeps nothing alive that `fit` does not.

    Args:
        dataset: The dataset whose `on_epoch_begin` Keras is calling.
        fit_frame: Keras's `fit` frame.

    Returns:
        Whether it warned.
    """
    names = fit_frame.f_locals
    listed = getattr(names.get("callbacks"), "callbacks", names.get("callbacks"))
    callbacks = list(listed or ())
    epoch = names.get("epoch")
    if any(
        isinstance(cb, SyncEpoch) and any(d is dataset for d in cb.datasets)
        for cb in callbacks
    ):
        return False
    restore = any(isinstance(cb, keras.callbacks.BackupAndRestore) for cb in callbacks)
    own = getattr(dataset, "epoch", None)
    if restore:
        why = (
            "`BackupAndRestore` is among the callbacks, but no `SyncEpoch` "
            "sets this dataset's epoch: a run it resumes would start the "
            "dataset at epoch 0 and read other batches than the interrupted "
            "run would have."
        )
    elif isinstance(epoch, int) and epoch > 0 and own is not None and own != epoch:
        why = (
            f"This fit starts at Keras's epoch {epoch}, but the dataset is at "
            f"epoch {own}: it reads epoch {own}'s order and random draws as "
            f"epoch {epoch}, not what a run that was not resumed would read."
        )
    else:
        return False
    warnings.warn(
        f"{why} Add SyncEpoch(ds), ds being this {type(dataset).__name__}, "
        f"to fit's callbacks (`from keras_oom import SyncEpoch`): it sets "
        f"the dataset to Keras's epoch as each epoch begins.",
        UserWarning,
        stacklevel=2,
    )
    return True

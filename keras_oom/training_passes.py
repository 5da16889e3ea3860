"""`TrainingPasses`: which of Keras's epoch hooks end a pass of training.

A dataset's epoch is one pass over its batches; Keras's epochs, and its
`on_epoch_end` calls, are not. `TrainingPasses` is the bookkeeping a
dataset keeps to advance its epoch once per pass of training: which
indices training read, how many batches Keras's epochs consumed, and which
`fit` came last (`trained_by_this_fit`, used by `SyncEpoch`). Which Keras
method is calling is read from the stack by `keras_stack.py`.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

from keras_oom.keras_stack import (
    _BUILD,
    _NOT_TRAINING,
    _OTHER_PASSES,
    _fit_iterator,
    _keras_caller,
    _keras_frame,
    _read_context,
)


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
            # callbacks.py imports this module: import it when first needed.
            from keras_oom.callbacks import warn_if_resume_differs

            self._warned = warn_if_resume_differs(dataset, frame)

    def read(self, index: int) -> None:
        """Call for every batch handed out, with its index in the pass."""
        caller, reader = _read_context(sys._getframe(1))
        if caller in _NOT_TRAINING:
            return
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

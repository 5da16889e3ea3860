"""Following Keras's epochs: the `SyncEpoch` callback and `TrainingPasses`.

`SyncEpoch` sets datasets to Keras's epoch index as each training epoch
begins. `TrainingPasses` lets a dataset tell, from inside its
`on_epoch_begin` / `on_epoch_end`, which of Keras's calls close a training
epoch, so that its own epoch count can advance once per training epoch.

Kept apart from the package's top level because it imports Keras, which
worker processes must never do.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import Any

import keras


class SyncEpoch(keras.callbacks.Callback):
    """Sets each dataset's epoch to Keras's epoch index as every epoch begins.

    A dataset's order and randomness are functions of `(seed, epoch)`. Its
    own epoch count advances once per training epoch, counted from when
    the dataset was built, so a run resumed in a new process (whose dataset
    starts at epoch 0) would not see the same data. With this callback,
    training epoch `e` reads epoch `e` of every dataset, whatever happened
    before: `fit(..., initial_epoch=e)` and
    `keras.callbacks.BackupAndRestore` resume on exactly the same order and
    the same `rng` draws as the uninterrupted run. It also makes a
    validation dataset's augmentation follow the epoch.

    Keras calls `on_epoch_begin` before it requests the epoch's first batch,
    so a `PrefetchLoaderDataset` discards at most the batches it had loaded
    ahead for another epoch.

    Args:
        *datasets: One or more datasets with a `set_epoch(int)` method, such
            as `LoaderDataset` and `PrefetchLoaderDataset`: usually the
            training dataset, plus a validation dataset whose augmentation
            should follow the epoch too.

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
    # Keras's epoch index; SyncEpoch puts the dataset on the same epoch.
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

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._first_epoch = True

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Sets every dataset's epoch to `epoch`, Keras's epoch index.

        An endless dataset (`repeat=True`) is set only as the first epoch
        of a `fit` begins: Keras then keeps reading one iterator through all
        epochs (index `i` of the fit is batch `i % batches_per_epoch` of
        epoch `epoch + i // batches_per_epoch`), so a later reset would skip
        ahead.
        """
        first = self._first_epoch
        self._first_epoch = False
        for ds in self.datasets:
            if getattr(ds, "repeat", False):
                if not first:
                    continue
                self._check_steps(ds)
            ds.set_epoch(epoch)

    def _check_steps(self, ds: Any) -> None:
        steps = (self.params or {}).get("steps")
        per_epoch = getattr(ds, "batches_per_epoch", None)
        if steps is not None and per_epoch is not None and steps != per_epoch:
            warnings.warn(
                f"SyncEpoch can resume an endless (repeat=True) dataset on the "
                f"same batches only when steps_per_epoch equals its "
                f"batches_per_epoch ({per_epoch}). Received: steps_per_epoch="
                f"{steps}: a fit started at initial_epoch=k reads from batch 0 "
                f"of the dataset's epoch k, not where an uninterrupted run was.",
                UserWarning,
                stacklevel=2,
            )


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Keras methods whose on_epoch_end calls never close a training epoch: the
# build peek (`_symbolic_build`, TensorFlow's `_maybe_symbolic_build`),
# evaluate (also fit's validation) and predict.
_NOT_TRAINING = frozenset(
    {"evaluate", "predict", "_symbolic_build", "_maybe_symbolic_build"}
)


class TrainingPasses:
    """Tells which of Keras's `on_epoch_end` calls close a training epoch.

    Keras calls a `PyDataset`'s `on_epoch_end` more often than there are
    training epochs: `fit` calls it once before its first epoch (its
    iterator's `reset()`), after a one-batch peek to build the model on JAX
    and torch; `evaluate` calls it before and after reading; `predict` after.
    A dataset that calls `begin()` in `on_epoch_begin` and advances its
    epoch only when `end()` in `on_epoch_end` returns True counts exactly
    the training epochs, on JAX, torch and TensorFlow alike.

    The rule: `end()` is True when
    - the call comes from `Model.fit`, and an `on_epoch_begin` from
      `Model.fit` (a training epoch's) came since the last True (fit's
      `reset()` before the first epoch has none; an epoch cut short by
      `stop_training` counts at the next `fit`'s `reset()`);
    - or it comes from outside Keras's `fit`, `evaluate`, `predict` and
      build code (a hand-written loop, a custom trainer): advancing too
      often keeps the data shuffled, never advancing would freeze it.
    It is False inside `evaluate`, `predict` and the build peek.

    Which Keras method is calling is read from the Python stack: the
    innermost frame of Keras's own `fit`, `evaluate`, `predict` or build
    code. The hooks run on the trainer's thread in Keras 3 (verified on
    3.15 for all three backends).
    """

    def __init__(self) -> None:
        self._pending = False  # a training epoch began and has not counted
        self._checked_fit: int | None = None  # id() of the last fit frame seen
        self._warned = False  # warn_if_resume_differs: once per dataset

    def begin(self, dataset: Any = None) -> None:
        """Call from the dataset's `on_epoch_begin`, with the dataset.

        At the first training epoch of each `fit`, checks once whether a
        resumed run would read other data (`warn_if_resume_differs`).
        """
        frame = _keras_frame(sys._getframe(1))
        if frame is None or frame.f_code.co_name != "fit":
            return
        self._pending = True
        if not self._warned and dataset is not None and id(frame) != self._checked_fit:
            self._checked_fit = id(frame)
            self._warned = warn_if_resume_differs(dataset, frame)

    def end(self) -> bool:
        """Call from the dataset's `on_epoch_end`; True: advance the epoch."""
        caller = _keras_caller(sys._getframe(1))
        if caller in _NOT_TRAINING:
            return False
        if caller == "fit" and not self._pending:
            return False
        self._pending = False
        return True

    def reset(self) -> None:
        """Forgets a pending training epoch, e.g. after `set_epoch`."""
        self._pending = False


_KERAS_DIR = os.path.dirname(os.path.abspath(keras.__file__))
_KNOWN = _NOT_TRAINING | {"fit"}


def _keras_caller(frame: FrameType | None) -> str | None:
    """The name of the innermost of Keras's fit / evaluate / predict / build."""
    found = _keras_frame(frame)
    return None if found is None else found.f_code.co_name


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

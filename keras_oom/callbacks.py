"""Following Keras's epochs: the `SyncEpoch` callback.

A dataset's epoch is one pass over its batches, which is not always one of
Keras's epochs (`steps_per_epoch`). `TrainingPasses` (`training_passes.py`,
re-exported here) lets a dataset tell which of Keras's calls end a pass of
training, reading the caller from the stack (`keras_stack.py`). `SyncEpoch`
places datasets where an uninterrupted run is, as a `fit` begins, so that a
resumed run reads the same batches; `warn_if_resume_differs` warns when a
`fit` would resume on other data without it.

Kept apart from the package's top level because it imports Keras, which
worker processes must never do.
"""

from __future__ import annotations

import math
import warnings
from types import FrameType
from typing import Any

import keras

# Re-exported: `from keras_oom.callbacks import TrainingPasses` keeps working.
from keras_oom.training_passes import TrainingPasses, trained_by_this_fit

__all__ = [
    "SyncEpoch",
    "TrainingPasses",
    "trained_by_this_fit",
    "warn_if_resume_differs",
]


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

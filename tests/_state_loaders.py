"""Loaders whose state changes between epochs, for tests/test_state.py.

Importable by workers started as fresh interpreters ("subprocess", "spawn",
"forkserver"), which unpickle these classes by reference. The dataset
subclasses import keras_oom's dataset classes (and so Keras) in such a
worker, as a user's subclass does.
"""

from __future__ import annotations

import threading

import numpy as np

from keras_oom.dataset import LoaderDataset
from keras_oom.prefetch import PrefetchLoaderDataset


def tagged(ids, tag):
    """One row per id: the id and the state the loader saw."""
    return np.column_stack([np.asarray(ids), np.full(len(ids), tag)]).astype("int64")


class CurriculumMixin:
    """`level` goes up at every `on_epoch_end`, before or after the base's."""

    def __init__(self, *args, after=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.level = 0
        self.after = after

    def load(self, ids):
        return tagged(ids, self.level)

    def on_epoch_end(self):
        if not self.after:
            self.level += 1
        super().on_epoch_end()
        if self.after:
            self.level += 1


class PlainCurriculum(CurriculumMixin, LoaderDataset):
    pass


class PrefetchCurriculum(CurriculumMixin, PrefetchLoaderDataset):
    pass


class EpochMixin:
    """A `load` that reads the dataset's own epoch, set by `set_epoch`."""

    def load(self, ids):
        return tagged(ids, self.epoch)


class PlainEpochAware(EpochMixin, LoaderDataset):
    pass


class PrefetchEpochAware(EpochMixin, PrefetchLoaderDataset):
    pass


class LevelLoader:
    """A callable loader object whose attribute the user changes."""

    level = 0

    def __call__(self, ids):
        return tagged(ids, self.level)


class LockingMixin(CurriculumMixin):
    """Gives itself a new lock every epoch: state that cannot travel."""

    def on_epoch_end(self):
        super().on_epoch_end()
        self.guard = threading.Lock()


class PrefetchLocking(LockingMixin, PrefetchLoaderDataset):
    pass

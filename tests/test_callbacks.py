"""SyncEpoch: training epoch `e` reads epoch `e` of the dataset, however started.

Without it a dataset's epoch follows Keras's `on_epoch_end` calls, which
outnumber the training epochs (the build peek on JAX and torch, the reset
before every fit, evaluate), so a run resumed with `initial_epoch` reads other
batches than the uninterrupted one. These tests record which sample ids each
training epoch reads.
"""

from __future__ import annotations

import textwrap
import warnings

import keras
import numpy as np
import pytest

from keras_oom import LoaderDataset, SyncEpoch
from keras_oom.callbacks import TrainingPasses

pytestmark = pytest.mark.timeout(60)

IDS = np.arange(24)


class Recorder(keras.callbacks.Callback):
    """Names the Keras epoch that a dataset's reads belong to."""

    def __init__(self):
        super().__init__()
        self.epoch = None  # None: outside a training epoch
        self.training = False

    def on_train_begin(self, logs=None):
        self.training = True

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.epoch = None


class RecordingDataset(LoaderDataset):
    """Logs the ids of every batch Keras reads inside one of the dataset's passes.

    A pass runs from the dataset's `on_epoch_begin` to its `on_epoch_end`.
    Reads outside a pass (TensorFlow's shape inference) are not logged in
    `reads`: on TensorFlow, tf.data reads ahead in a thread, so the time of a
    read does not say which epoch trains on it, but the pass does. `stream`
    logs every read after `on_train_begin`, in order.
    """

    def __init__(self, recorder, reads, **kwargs):
        cfg = {"batch_size": 6, "shuffle": True, "seed": 11, **kwargs}
        super().__init__(_load, IDS, (IDS % 3) * 1.0, **cfg)
        self.recorder, self.reads, self.stream = recorder, reads, []
        self.in_pass = False

    def on_epoch_begin(self):
        self.in_pass = True
        super().on_epoch_begin()

    def on_epoch_end(self):
        self.in_pass = False
        super().on_epoch_end()

    def __getitem__(self, index):
        ids = tuple(self.batch_ids(index).tolist())
        if self.in_pass:
            self.reads.append((self.recorder.epoch, ids))
        if self.recorder.training:
            self.stream.append(ids)
        return super().__getitem__(index)


def _load(ids):
    return ids.astype("float32")[:, None] / 24.0


def recording_dataset(recorder, reads, **kwargs):
    return RecordingDataset(recorder, reads, **kwargs)


def model():
    m = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    m.compile(optimizer="sgd", loss="mse")
    return m


def by_epoch(reads):
    out = {}
    for epoch, ids in reads:
        if epoch is not None:
            out.setdefault(epoch, []).append(ids)
    return out


def expected_epoch(epoch, **kwargs):
    ref = recording_dataset(Recorder(), [], **kwargs)
    ref.set_epoch(epoch)
    return [tuple(ref.batch_ids(i).tolist()) for i in range(len(ref))]


# -- construction -----------------------------------------------------------------


def test_needs_at_least_one_dataset():
    with pytest.raises(TypeError, match="at least one dataset"):
        SyncEpoch()


@pytest.mark.parametrize("bad", [None, np.arange(3), "train", [1, 2]])
def test_rejects_an_argument_without_set_epoch(bad):
    ds = LoaderDataset(lambda ids: ids, IDS, batch_size=4)
    with pytest.raises(TypeError, match=r"datasets\[1\]=.*of type"):
        SyncEpoch(ds, bad)


def test_is_a_keras_callback():
    ds = LoaderDataset(lambda ids: ids, IDS, batch_size=4)
    assert isinstance(SyncEpoch(ds), keras.callbacks.Callback)


def test_sets_every_dataset_to_the_keras_epoch():
    a = LoaderDataset(lambda ids: ids, IDS, batch_size=4)
    b = LoaderDataset(lambda ids: ids, IDS, batch_size=4)
    b.set_epoch(9)
    cb = SyncEpoch(a, b)
    cb.on_train_begin()
    cb.on_epoch_begin(3)
    assert (a.epoch, b.epoch) == (3, 3)


# -- in fit ------------------------------------------------------------------------


def test_training_epoch_e_reads_dataset_epoch_e():
    rec, reads = Recorder(), []
    train = recording_dataset(rec, reads)
    model().fit(
        train, epochs=3, shuffle=False, verbose=0, callbacks=[SyncEpoch(train), rec]
    )
    got = by_epoch(reads)
    assert sorted(got) == [0, 1, 2]
    for e in range(3):
        assert got[e] == expected_epoch(e), e
    assert train.epoch == 3


def test_without_sync_epoch_training_epoch_e_reads_dataset_epoch_e():
    # Keras ends a dataset epoch before fit's first training epoch (after
    # its build peek on JAX and torch); the dataset counts only training
    # epochs, so a plain fit reads epoch e in training epoch e.
    rec, reads = Recorder(), []
    train = recording_dataset(rec, reads)
    model().fit(train, epochs=2, shuffle=False, verbose=0, callbacks=[rec])
    got = by_epoch(reads)
    assert got[0] == expected_epoch(0)
    assert got[1] == expected_epoch(1)
    assert train.epoch == 2


def test_initial_epoch_reads_what_the_uninterrupted_run_read():
    rec, reads = Recorder(), []
    full = recording_dataset(rec, reads)
    model().fit(
        full, epochs=4, shuffle=False, verbose=0, callbacks=[SyncEpoch(full), rec]
    )
    rec2, resumed_reads = Recorder(), []
    resumed = recording_dataset(rec2, resumed_reads)
    model().fit(
        resumed,
        epochs=4,
        initial_epoch=2,
        shuffle=False,
        verbose=0,
        callbacks=[SyncEpoch(resumed), rec2],
    )
    full_epochs, resumed_epochs = by_epoch(reads), by_epoch(resumed_reads)
    assert sorted(resumed_epochs) == [2, 3]
    for e in (2, 3):
        assert resumed_epochs[e] == full_epochs[e], e


def test_evaluate_between_fits_does_not_move_the_order():
    rec, reads = Recorder(), []
    train = recording_dataset(rec, reads)
    m = model()
    sync = SyncEpoch(train)
    m.fit(train, epochs=1, shuffle=False, verbose=0, callbacks=[sync, rec])
    m.evaluate(train, verbose=0)
    m.evaluate(train, verbose=0)
    m.fit(
        train,
        epochs=2,
        initial_epoch=1,
        shuffle=False,
        verbose=0,
        callbacks=[sync, rec],
    )
    assert by_epoch(reads)[1] == expected_epoch(1)


def run_with_validation(initial_epoch):
    rec, reads = Recorder(), []
    train = recording_dataset(rec, [])
    val = recording_dataset(rec, reads, seed=5)
    model().fit(
        train,
        validation_data=val,
        epochs=3,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=[SyncEpoch(train, val), rec],
    )
    return by_epoch(reads)


def test_validation_dataset_resumes_on_the_same_batches():
    # Validation runs inside training epoch e, after its batches. Which epoch
    # of the validation dataset it reads depends on the on_epoch_end calls
    # evaluate makes before reading (see docs/randomness.md), but it is the
    # same in a resumed run.
    full, resumed = run_with_validation(0), run_with_validation(1)
    assert sorted(resumed) == [1, 2]
    for e in (1, 2):
        assert resumed[e] == full[e], e
    assert full[1] != full[2]  # the validation order does follow the epoch


def test_endless_dataset_resumes_on_the_same_batches():
    # Keras reads an endless dataset through one iterator for the whole fit
    # (index i is batch i % B of epoch epoch + i // B), so SyncEpoch sets it
    # only as the fit's first epoch begins. Compared as streams of reads:
    # tf.data reads ahead across Keras epochs.
    full = recording_dataset(Recorder(), [], repeat=True)
    steps = full.batches_per_epoch
    rec = Recorder()
    full.recorder = rec
    model().fit(
        full,
        epochs=3,
        steps_per_epoch=steps,
        shuffle=False,
        verbose=0,
        callbacks=[SyncEpoch(full), rec],
    )
    resumed = recording_dataset(Recorder(), [], repeat=True)
    rec2 = Recorder()
    resumed.recorder = rec2
    model().fit(
        resumed,
        epochs=3,
        initial_epoch=1,
        steps_per_epoch=steps,
        shuffle=False,
        verbose=0,
        callbacks=[SyncEpoch(resumed), rec2],
    )
    expected = [b for e in range(3) for b in expected_epoch(e)]
    assert full.stream[: 3 * steps] == expected  # not epochs 0, 2, 4: set once
    assert resumed.stream[: 2 * steps] == expected[steps:]


def test_endless_dataset_with_other_steps_per_epoch_resumes_without_warning():
    # SyncEpoch used to warn here: it set an endless dataset to epoch k, not
    # to the batch Keras epoch k starts at. It now places it in the stream
    # (tests/test_passes.py checks the batches), so there is nothing to say.
    rec = Recorder()
    train = recording_dataset(rec, [], repeat=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model().fit(
            train,
            epochs=2,
            initial_epoch=1,
            steps_per_epoch=train.batches_per_epoch - 1,
            shuffle=False,
            verbose=0,
            callbacks=[SyncEpoch(train), rec],
        )
    assert not [w for w in caught if "SyncEpoch" in str(w.message)]
    # Keras epoch 1 begins after steps_per_epoch = B - 1 batches of epoch 0.
    ref = recording_dataset(Recorder(), [], repeat=True)
    last = train.batches_per_epoch - 1
    assert train.stream[:2] == [
        tuple(ref.batch_ids(i).tolist()) for i in (last, last + 1)
    ]


def test_docstring_example_runs():
    doc = SyncEpoch.__doc__
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(textwrap.dedent(code), "SyncEpoch.__doc__", "exec"), {})


# -- TrainingPasses: the dataset's own count, once per training epoch ----------


class Counted(RecordingDataset):
    """A dataset whose epoch advances only when `TrainingPasses` says so."""

    def __init__(self, recorder, reads, **kwargs):
        super().__init__(recorder, reads, **kwargs)
        self.passes = TrainingPasses()

    def on_epoch_begin(self):
        self.passes.begin()
        super().on_epoch_begin()

    def on_epoch_end(self):
        if self.passes.end():
            super().on_epoch_end()
        else:
            self.in_pass = False


def unbuilt_model():
    # No Input: JAX and torch read a batch to build it (the "peek").
    m = keras.Sequential([keras.layers.Dense(1)])
    m.compile(optimizer="sgd", loss="mse")
    return m


@pytest.mark.parametrize("make_model", [model, unbuilt_model])
def test_count_advances_once_per_training_epoch(make_model):
    rec, reads = Recorder(), []
    train = Counted(rec, reads)
    m = make_model()
    m.fit(train, epochs=2, shuffle=False, verbose=0, callbacks=[rec])
    assert train.epoch == 2
    got = by_epoch(reads)
    assert got[0] == expected_epoch(0) and got[1] == expected_epoch(1)
    m.evaluate(train, verbose=0)
    m.predict(train, verbose=0)
    assert train.epoch == 2  # evaluate and predict leave it alone
    reads.clear()
    m.fit(train, epochs=1, shuffle=False, verbose=0, callbacks=[rec])
    assert train.epoch == 3
    assert by_epoch(reads)[0] == expected_epoch(2)


def test_validation_on_the_training_dataset_does_not_count():
    rec = Recorder()
    train = Counted(rec, [])
    model().fit(
        train,
        validation_data=train,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[rec],
    )
    assert train.epoch == 3


def test_an_epoch_cut_short_counts_at_the_next_fit():
    class StopAtBatch1(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                self.model.stop_training = True

    rec = Recorder()
    train = Counted(rec, [])
    m = model()
    m.fit(train, epochs=3, shuffle=False, verbose=0, callbacks=[StopAtBatch1()])
    m.evaluate(train, verbose=0)
    assert train.epoch == 0
    m.fit(train, epochs=1, shuffle=False, verbose=0)
    assert train.epoch == 2  # the cut epoch, then this fit's


def test_a_hand_written_loop_advances_on_every_end():
    train = Counted(Recorder(), [])
    for _ in range(3):
        train.on_epoch_begin()
        train.on_epoch_end()
    assert train.epoch == 3


def test_an_unknown_model_method_advances():
    # A custom trainer: advancing too often keeps shuffling; never would not.
    class Custom(keras.Sequential):
        def my_loop(self, ds):
            ds.on_epoch_begin()
            ds.on_epoch_end()

    train = Counted(Recorder(), [])
    Custom([keras.Input((1,)), keras.layers.Dense(1)]).my_loop(train)
    assert train.epoch == 1

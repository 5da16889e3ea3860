"""Issue 14, Kind E item 8: every pass over the data yields every sample once.

With `steps_per_epoch` smaller than the batches of one pass, Keras goes on
reading the same iterator in its next epoch (index 2, 3, ... of the pass it
started), and starts a new pass only once the iterator has yielded every
batch. A dataset that reshuffled at every Keras epoch read some samples
twice and others never within one pass. The dataset's epoch now counts
passes: training's `g`-th batch is batch `g % B` of epoch `g // B` (`B`
batches per epoch), whatever `steps_per_epoch`, and `SyncEpoch` resumes a
run at the same place in that stream.

The tests train real Keras models (the JAX backend in the suite) on both
dataset classes; labels are the sample ids, so each read's `y` says which
samples it held.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import functools
import math
import sys
import threading
import time
import warnings
from collections import Counter

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_oom import LoaderDataset, PrefetchLoaderDataset, SyncEpoch

pytestmark = pytest.mark.timeout(120)

CLASSES = [LoaderDataset, PrefetchLoaderDataset]


def features(ids):
    return np.asarray(ids, dtype="float32")[:, None] / 100.0


TENSORFLOW = keras.backend.backend() == "tensorflow"


class Reads:
    """Records the sample ids of every batch a dataset hands out (its `y`).

    On TensorFlow these include what tf.data reads ahead and then drops with
    its iterator (at the end of a `fit`): what training consumed is recorded
    by the model (`model().trained`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = []
        self.read_done = threading.Condition()

    def __getitem__(self, index):
        batch = super().__getitem__(index)
        if not _tf_shape_peek():
            with self.read_done:
                self.reads.append(tuple(np.asarray(batch[1]).astype(int).tolist()))
                self.read_done.notify_all()
        return batch

    def wait_for_reads(self, count, timeout=10.0):
        """Waits until `count` batches were read; False at the deadline."""
        deadline = time.monotonic() + timeout
        with self.read_done:
            while len(self.reads) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.read_done.wait(left)
        return True


def _tf_shape_peek() -> bool:
    """Whether TensorFlow's adapter is reading batches 0 and 1 to learn their
    shapes (`get_tf_dataset`), before training reads them: not training."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "get_tf_dataset":
            return True
        frame = frame.f_back
    return False


class PlainReads(Reads, LoaderDataset):
    pass


class PrefetchReads(Reads, PrefetchLoaderDataset):
    pass


def recording(cls, n, **kwargs):
    ids = np.arange(n)
    if cls is PrefetchLoaderDataset:
        per_epoch = LoaderDataset(features, ids, **kwargs).batches_per_epoch
        workers = min(2, per_epoch)
        return PrefetchReads(features, ids, ids, num_workers=workers, **kwargs)
    return PlainReads(features, ids, ids, **kwargs)


class Consuming(keras.Sequential):
    """Records the sample ids (`y`) of every batch its training and
    evaluation steps receive: what Keras consumed, on every backend (JAX's
    steps take `(state, data)`, the others' `(data)`)."""

    def train_step(self, *args):
        self.trained.append(_ids(args[-1][1]))
        return super().train_step(*args)

    def test_step(self, *args):
        self.tested.append(_ids(args[-1][1]))
        return super().test_step(*args)


def _ids(y):
    return tuple(keras.ops.convert_to_numpy(y).astype(int).tolist())


def model():
    """A model whose fit reads only training batches: built, with its loss
    and metrics too, so that JAX and torch do not read one to build it.
    Eager, so that its steps can record what they receive."""
    m = Consuming([keras.Input((1,)), keras.layers.Dense(1)])
    m.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    m.trained, m.tested = [], []
    m.train_on_batch(np.zeros((1, 1), "float32"), np.zeros((1,), "float32"))
    m.trained.clear()
    return m


def fit(ds, m=None, **kwargs):
    """Fits `m` (a new model by default) on `ds`; returns the model."""
    m = model() if m is None else m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ran out of data": Keras's own
        m.fit(ds, shuffle=False, verbose=0, **kwargs)
    return m


class ReadAhead(keras.callbacks.Callback):
    """On TensorFlow, holds Keras after its `step`-th training step (counted
    over the fit) until tf.data has read `reads` batches of the dataset: a
    read-ahead that tf.data always does, made certain before Keras goes on.
    Elsewhere reads are synchronous and it does nothing."""

    def __init__(self, ds, step, reads):
        super().__init__()
        self.ds, self.step, self.reads, self.steps = ds, step, reads, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if TENSORFLOW and self.steps == self.step:
            assert self.ds.wait_for_reads(self.reads), "tf.data read no batch ahead"


def passes(reads, per_epoch):
    """The reads cut into passes of `per_epoch` batches (the last may be cut)."""
    return [reads[i : i + per_epoch] for i in range(0, len(reads), per_epoch)]


def stream(n, epochs, **kwargs):
    """What training should read: epochs 0, 1, ... of a reference dataset."""
    ref = LoaderDataset(features, np.arange(n), np.arange(n), **kwargs)
    out = []
    for e in range(epochs):
        ref.set_epoch(e)
        out += [tuple(ref.batch_ids(b).tolist()) for b in range(ref.batches_per_epoch)]
    return out


def close(ds):
    if isinstance(ds, PrefetchLoaderDataset):
        ds.close()


# -- the case ---------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_steps_per_epoch_below_the_pass_reads_each_sample_once_per_pass(cls):
    """Kind E: fit(epochs=5, steps_per_epoch=2) on 20 shuffled ids in batches
    of 2 read samples 1, 6, 8, 16, 18 twice and 0, 2, 10, 14, 17, 19 never."""
    ds = recording(cls, 20, batch_size=2, shuffle=True, seed=0)
    try:
        fit(ds, epochs=5, steps_per_epoch=2)
    finally:
        close(ds)
    assert len(ds.reads) == 10  # one pass, cut into 5 Keras epochs
    samples = Counter(s for batch in ds.reads for s in batch)
    assert samples == Counter(range(20))
    assert ds.reads == stream(20, 1, batch_size=2, shuffle=True, seed=0)
    assert ds.epoch == 1  # the pass is over


@pytest.mark.parametrize("cls", CLASSES)
def test_steps_not_dividing_the_pass(cls):
    """Kind E: 10 batches, 3 steps per Keras epoch: Keras reads 3, 3, 3, 1
    per pass; every pass still holds every sample once, reshuffled."""
    ds = recording(cls, 20, batch_size=2, shuffle=True, seed=4)
    try:
        fit(ds, epochs=8, steps_per_epoch=3)
    finally:
        close(ds)
    assert ds.reads == stream(20, 2, batch_size=2, shuffle=True, seed=4)
    assert ds.epoch == 2


@pytest.mark.parametrize("cls", CLASSES)
def test_a_shard_is_a_pass_of_its_own(cls):
    """Kind E: with shard=(1, 2) a pass is the shard's batches, read once."""
    cfg = {"batch_size": 2, "shuffle": True, "seed": 7, "shard": (1, 2)}
    ds = recording(cls, 20, **cfg)
    try:
        fit(ds, epochs=6, steps_per_epoch=2)  # 5 batches a pass: 2, 2, 1
    finally:
        close(ds)
    assert ds.batches_per_epoch == 5
    assert ds.reads == stream(20, 2, **cfg)
    assert ds.epoch == 2


@pytest.mark.parametrize("cls", CLASSES)
def test_validation_on_the_training_dataset_mid_pass(cls):
    """Kind E: evaluate between Keras epochs reads the dataset from its first
    batch; it must neither end nor restart the training pass."""
    cfg = {"batch_size": 2, "shuffle": True, "seed": 1}
    ds = recording(cls, 12, **cfg)
    val = LoaderDataset(features, np.arange(12), np.arange(12), batch_size=4)
    try:
        m = fit(ds, validation_data=ds, epochs=6, steps_per_epoch=2)
        m.evaluate(val, verbose=0)
    finally:
        close(ds)
    epochs = stream(12, 3, **cfg)
    assert m.trained == epochs[:12]
    assert ds.epoch == 2
    # Each validation reads the 6 batches of the epoch training is in (the
    # pass of Keras epochs 0-2 is over once epoch 2 has trained).
    current = [0, 0, 1, 1, 1, 2]
    assert m.tested[:36] == [b for e in current for b in epochs[6 * e : 6 * e + 6]]


@pytest.mark.parametrize("cls", CLASSES)
def test_a_pass_left_unfinished_ends_when_the_next_fit_starts(cls):
    """Kind E: the next fit starts a fresh pass of the next epoch."""
    ds = recording(cls, 20, batch_size=2, shuffle=True, seed=2)
    try:
        first = fit(ds, epochs=3, steps_per_epoch=2)  # 6 of 10 batches
        assert ds.epoch == 0
        second = fit(ds, epochs=5, steps_per_epoch=2)
    finally:
        close(ds)
    expected = stream(20, 2, batch_size=2, shuffle=True, seed=2)
    assert first.trained + second.trained == expected[:6] + expected[10:]
    assert ds.epoch == 2


@pytest.mark.parametrize("cls", CLASSES)
def test_a_pass_read_ahead_but_not_trained_on_is_not_over(cls):
    """Kind E: on TensorFlow, tf.data reads the last batch of a pass before
    Keras trains on it; after fit(epochs=2, steps_per_epoch=2) on 5 batches
    training consumed 4 (the 5th was only read ahead, then dropped with the
    iterator): the pass is not over, as on JAX and torch, and the next fit
    starts epoch 1. The dataset ended the pass at the 5th read instead."""
    ds = recording(cls, 10, batch_size=2, shuffle=True, seed=8)
    try:
        first = fit(ds, epochs=2, steps_per_epoch=2, callbacks=[ReadAhead(ds, 4, 5)])
        assert ds.epoch == 0
        second = fit(ds, epochs=1, steps_per_epoch=5)
    finally:
        close(ds)
    expected = stream(10, 2, batch_size=2, shuffle=True, seed=8)
    assert first.trained == expected[:4]
    assert second.trained == expected[5:]
    assert ds.epoch == 2


@pytest.mark.parametrize("cls", CLASSES)
def test_an_endless_dataset_resumes_after_what_training_consumed(cls):
    """Kind E: repeat=True, 3 batches per epoch; fit(epochs=2,
    steps_per_epoch=3) trains on epochs 0 and 1 while tf.data reads batch 0
    of epoch 2 ahead. The next fit starts epoch 2, as on JAX and torch; the
    dataset counted the read-ahead as read and skipped to epoch 3."""
    cfg = {"batch_size": 2, "shuffle": True, "seed": 9, "repeat": True}
    ds = recording(cls, 6, **cfg)
    try:
        first = fit(ds, epochs=2, steps_per_epoch=3, callbacks=[ReadAhead(ds, 6, 7)])
        second = fit(ds, epochs=1, steps_per_epoch=3)
    finally:
        close(ds)
    expected = stream(6, 3, **cfg)
    assert first.trained == expected[:6]
    assert second.trained == expected[6:]


@pytest.mark.parametrize("cls", CLASSES)
def test_keras_batch_shuffle_with_short_epochs_covers_each_pass(cls):
    """Kind E: fit(shuffle=True) permutes the indices of each pass; a pass
    still holds every sample once."""
    ds = recording(cls, 16, batch_size=2, shuffle=True, seed=3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # out-of-order reads
            model().fit(ds, epochs=8, steps_per_epoch=2, shuffle=True, verbose=0)
    finally:
        close(ds)
    per_epoch = stream(16, 2, batch_size=2, shuffle=True, seed=3)
    for p, reads in enumerate(passes(ds.reads, 8)):
        assert sorted(reads) == sorted(per_epoch[8 * p : 8 * p + 8])


# -- the property ---------------------------------------------------------------


@st.composite
def runs(draw):
    n = draw(st.integers(1, 24), label="n")
    batch_size = draw(st.integers(1, n), label="batch_size")
    per_epoch = math.ceil(n / batch_size)
    repeat = draw(st.booleans(), label="repeat")
    steps = draw(st.integers(1, 2 * per_epoch + 1), label="steps_per_epoch")
    epochs = min(12, draw(st.integers(1, 3)) * math.ceil(per_epoch / steps) + 1)
    return {
        "n": n,
        "batch_size": batch_size,
        "shuffle": draw(st.booleans(), label="shuffle"),
        "seed": draw(st.integers(0, 2**32 - 1), label="seed"),
        "repeat": repeat,
        "steps": steps,
        "epochs": epochs,
    }


def check_stream(cls, run):
    cfg = {k: run[k] for k in ("batch_size", "shuffle", "seed", "repeat")}
    ds = recording(cls, run["n"], **cfg)
    try:
        fit(ds, epochs=run["epochs"], steps_per_epoch=run["steps"])
    finally:
        close(ds)
    per_epoch = ds.batches_per_epoch
    expected = stream(run["n"], len(ds.reads) // per_epoch + 1, **cfg)
    # Training's g-th batch is batch g % B of epoch g // B: every pass holds
    # every sample once, and passes follow the epochs in order.
    assert ds.reads == expected[: len(ds.reads)]
    for reads in passes(ds.reads, per_epoch):
        samples = [s for batch in reads for s in batch]
        assert len(samples) == len(set(samples))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run=runs())
def test_every_pass_yields_every_sample_once_loader_dataset(run):
    """Kind E: for any steps_per_epoch, batch size, size, shuffle and seed."""
    check_stream(LoaderDataset, run)


# Fewer examples than for LoaderDataset: each starts a pool, and the
# property is the same; the differential test covers the pool more widely.
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run=runs())
def test_every_pass_yields_every_sample_once_prefetch_dataset(run):
    """Kind E: the same property with workers loading ahead."""
    check_stream(PrefetchLoaderDataset, run)


# -- SyncEpoch: a resumed run reads the same stream -----------------------------


def resumed_reads(cls, n, initial_epoch, epochs, steps, **cfg):
    ds = recording(cls, n, **cfg)
    try:
        m = fit(
            ds,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            callbacks=[SyncEpoch(ds)],
        )
    finally:
        close(ds)
    return m.trained


@functools.cache
def uninterrupted(n, steps, repeat):
    """The uninterrupted run of the resume test, on `LoaderDataset`: the
    reference for both classes (a pool's full run would only repeat it)."""
    cfg = {"batch_size": 2, "shuffle": True, "seed": 5, "repeat": repeat}
    return resumed_reads(LoaderDataset, n, 0, 7, steps, **cfg)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    ("n", "steps", "repeat"),
    [
        (20, 2, False),  # 10 batches, 5 Keras epochs per pass
        (20, None, False),  # one Keras epoch per pass
        (20, 3, True),  # endless: Keras epochs cross epochs anywhere
        (20, 14, True),  # more steps than one epoch's batches
    ],
)
def test_sync_epoch_resumes_on_the_uninterrupted_stream(cls, n, steps, repeat):
    """Kind E: fit(initial_epoch=k) with SyncEpoch reads what epochs k... of
    the uninterrupted run read, also when a Keras epoch is not a pass."""
    cfg = {"batch_size": 2, "shuffle": True, "seed": 5, "repeat": repeat}
    per_keras_epoch = steps or 10  # batches each Keras epoch reads
    full = uninterrupted(n, steps, repeat)
    resumed = resumed_reads(cls, n, 3, 7, steps, **cfg)
    assert len(full) == 7 * per_keras_epoch
    assert resumed == full[3 * per_keras_epoch :]


def test_sync_epoch_warns_when_a_resume_cannot_match():
    """Kind E: 10 batches in Keras epochs of 3 (3, 3, 3, 1 per pass): a run
    resumed mid-pass is cut into other Keras epochs; SyncEpoch says so."""
    ds = recording(LoaderDataset, 20, batch_size=2, shuffle=True, seed=5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model().fit(
            ds,
            epochs=3,
            initial_epoch=1,
            steps_per_epoch=3,
            shuffle=False,
            verbose=0,
            callbacks=[SyncEpoch(ds)],
        )
    (w,) = [w for w in record if "SyncEpoch" in str(w.message)]
    assert "steps_per_epoch=3" in str(w.message) and "repeat=True" in str(w.message)
    # It still goes on from the same place in the stream.
    full = stream(20, 1, batch_size=2, shuffle=True, seed=5)
    assert ds.reads[:3] == full[3:6]


def test_sync_epoch_sets_a_validation_dataset_to_every_keras_epoch():
    """Kind E: a validation dataset reads a whole pass per Keras epoch, so it
    follows Keras's epoch index even when training's passes are longer."""
    train = recording(LoaderDataset, 20, batch_size=2, shuffle=True, seed=5)
    val = recording(LoaderDataset, 8, batch_size=4, shuffle=True, seed=6)
    m = fit(
        train,
        validation_data=val,
        epochs=3,
        steps_per_epoch=2,
        callbacks=[SyncEpoch(train, val)],
    )
    assert m.tested == stream(8, 3, batch_size=4, shuffle=True, seed=6)
    assert m.trained == stream(20, 1, batch_size=2, shuffle=True, seed=5)[:6]

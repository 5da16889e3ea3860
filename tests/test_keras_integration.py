"""`LoaderDataset` in real Keras training, on the JAX backend.

Each sample is a small .npy file loaded by the loader, as in the use case the
package exists for. The tests check that `fit`, `evaluate` and `predict`
accept the dataset, that `predict` rows line up with `sample_ids`, that a
`fit` with Keras's default batch-order shuffle still visits every sample
once per epoch, that the repeat mode trains with
`steps_per_epoch=ds.batches_per_epoch`, and that dict labels reach a model
with two named outputs. Models are tiny so the file runs in seconds.
"""

from __future__ import annotations

import os
import threading

os.environ.setdefault("KERAS_BACKEND", "jax")

from collections import Counter

import keras
import numpy as np
import pytest

from keras_oom import LoaderDataset

N, DIM = 22, 4


@pytest.fixture
def files(tmp_path):
    """N .npy files, one per sample; sample i holds the vector i + [0..DIM)."""
    paths = []
    for i in range(N):
        path = tmp_path / f"sample_{i:03d}.npy"
        np.save(path, (i + np.arange(DIM)).astype("float32") / N)
        paths.append(str(path))
    return np.array(paths)


def load_npy(paths):
    return np.stack([np.load(p) for p in paths])


def targets_of(paths):
    """A learnable target: the sum of each sample's vector."""
    return load_npy(paths).sum(axis=1, keepdims=True)


class RecordingDataset(LoaderDataset):
    """Records the ids of every `load` call and when each epoch ended."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []  # ("load", [ids]) and ("end", epoch-before)

    def load(self, ids):
        self.events.append(("load", list(ids)))
        return load_npy(ids)

    def on_epoch_end(self):
        self.events.append(("end", self.epoch))
        super().on_epoch_end()


def split_epochs(events):
    """The ids loaded between consecutive `on_epoch_end` calls."""
    epochs, current = [], []
    for kind, payload in events:
        if kind == "load":
            current.extend(payload)
        else:
            epochs.append(current)
            current = []
    if current:
        epochs.append(current)
    return epochs


def dense_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((DIM,))
    outputs = keras.layers.Dense(1)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def test_backend_is_jax():
    assert keras.backend.backend() == os.environ["KERAS_BACKEND"]


def test_fit_evaluate_predict(files):
    ds = LoaderDataset(
        load_npy, files, labels=targets_of(files), batch_size=5, shuffle=True, seed=0
    )
    model = dense_model()
    history = model.fit(ds, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    loss = model.evaluate(ds, verbose=0)
    assert np.isfinite(loss)
    pred = model.predict(LoaderDataset(load_npy, files, batch_size=5), verbose=0)
    assert pred.shape == (N, 1)


def test_predict_rows_line_up_with_sample_ids(files):
    order = np.random.default_rng(1).permutation(N)
    ids = files[order]  # an arbitrary id order
    inputs = keras.Input((DIM,))
    dense = keras.layers.Dense(2)
    model = keras.Model(inputs, dense(inputs))
    kernel = np.arange(DIM * 2, dtype="float32").reshape(DIM, 2)
    bias = np.array([1.0, -1.0], dtype="float32")
    dense.set_weights([kernel, bias])
    ds = LoaderDataset(load_npy, ids, batch_size=6)  # 22 = 3 * 6 + 4
    pred = model.predict(ds, verbose=0)
    expected = load_npy(ids) @ kernel + bias
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-5)
    # And the row of sample i is the one computed from file i.
    for row, i in enumerate(order):
        np.testing.assert_allclose(
            pred[row], np.load(files[i]) @ kernel + bias, rtol=1e-5, atol=1e-5
        )


def test_evaluate_uses_the_labels_of_each_sample(files):
    # An identity model with labels equal to the inputs has zero loss only
    # if every batch's labels belong to the batch's samples.
    inputs = keras.Input((DIM,))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))
    model.compile(loss="mse")
    ds = LoaderDataset(
        load_npy, files, labels=load_npy(files), batch_size=4, shuffle=True, seed=3
    )
    assert model.evaluate(ds, verbose=0) == pytest.approx(0.0, abs=1e-12)
    wrong = LoaderDataset(
        load_npy,
        files,
        labels=load_npy(files)[::-1],
        batch_size=4,
        shuffle=True,
        seed=3,
    )
    assert model.evaluate(wrong, verbose=0) > 1e-3


def test_fit_with_keras_shuffle_covers_every_sample_once_per_epoch(files):
    ds = RecordingDataset(
        sample_ids=files, labels=targets_of(files), batch_size=5, shuffle=True, seed=7
    )
    epochs = 3
    dense_model().fit(ds, epochs=epochs, shuffle=True, verbose=0)
    # Only the ends of training epochs advance the dataset's epoch.
    assert ds.epoch == epochs
    per_epoch = split_epochs(ds.events)
    # JAX reads one batch to build the model before the first epoch; the
    # last `epochs` groups are the training epochs.
    full = [ids for ids in per_epoch if len(ids) == N]
    assert len(full) >= epochs
    for ids in full[-epochs:]:
        assert Counter(ids) == Counter(files.tolist())
    assert len({tuple(ids) for ids in full[-epochs:]}) == epochs  # reshuffled


class IndexRecordingDataset(RecordingDataset):
    """Also records the index of every read, paired with the ids it loaded.

    TensorFlow reads from a tf.data thread while Keras ends epochs from the
    main thread, so the ids pass through a thread-local, not `events[-1]`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = []  # (index, ids)
        self._loaded = threading.local()

    def load(self, ids):
        self._loaded.ids = list(ids)
        return super().load(ids)

    def __getitem__(self, index):
        x = super().__getitem__(index)
        self.reads.append((index, self._loaded.ids))
        return x


def test_fit_with_repeat_and_steps_per_epoch(files):
    ds = IndexRecordingDataset(
        sample_ids=files,
        labels=targets_of(files),
        batch_size=5,
        shuffle=True,
        seed=2,
        repeat=True,
    )
    assert ds.num_batches is None and ds.batches_per_epoch == 5
    epochs = 3
    history = dense_model().fit(
        ds,
        epochs=epochs,
        steps_per_epoch=ds.batches_per_epoch,
        shuffle=False,  # an endless PyDataset is never batch-shuffled
        verbose=0,
    )
    assert len(history.history["loss"]) == epochs
    # Every training step's index was read; TensorFlow's tf.data also reads a
    # few ahead, and its shape inference reads 0 and 1 first.
    assert set(range(epochs * ds.batches_per_epoch)) <= {i for i, _ in ds.reads}
    # Each read loaded exactly the batch of its repeat-mode index...
    for i, ids in ds.reads:
        assert ids == ds.batch_ids(i).tolist()
    # ...and the indices of each epoch hold every sample once, reshuffled.
    orders = []
    for e in range(epochs):
        flat = [s for b in range(5) for s in ds.batch_ids(e * 5 + b).tolist()]
        assert Counter(flat) == Counter(files.tolist())
        orders.append(flat)
    assert orders[0] != orders[1]
    assert ds.epoch == 0  # the index carries the epoch in repeat mode


def test_fit_with_multi_output_dict_labels(files):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((DIM,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    total = keras.layers.Dense(1, name="total")(hidden)
    big = keras.layers.Dense(1, activation="sigmoid", name="big")(hidden)
    model = keras.Model(inputs, {"total": total, "big": big})
    model.compile(optimizer="adam", loss={"total": "mse", "big": "binary_crossentropy"})
    sums = targets_of(files)
    labels = {"total": sums, "big": (sums > np.median(sums)).astype("float32")}
    ds = LoaderDataset(
        load_npy, files, labels=labels, batch_size=8, shuffle=True, seed=1
    )
    history = model.fit(ds, epochs=2, verbose=0)
    assert {"loss", "total_loss", "big_loss"} <= set(history.history)
    assert all(np.isfinite(history.history["loss"]))
    pred = model.predict(LoaderDataset(load_npy, files, batch_size=8), verbose=0)
    assert pred["total"].shape == (N, 1) and pred["big"].shape == (N, 1)
    assert np.all((pred["big"] >= 0) & (pred["big"] <= 1))


def test_fit_with_keras_worker_threads(files):
    ds = LoaderDataset(
        load_npy,
        files,
        labels=targets_of(files),
        batch_size=5,
        workers=2,
        max_queue_size=2,
    )
    history = dense_model().fit(ds, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert all(np.isfinite(history.history["loss"]))


def test_loader_error_surfaces_from_fit_with_its_note(files):
    class Broken(Exception):
        pass

    def loader(paths):
        if files[13] in paths:
            raise Broken("corrupt file")
        return load_npy(paths)

    ds = LoaderDataset(loader, files, labels=targets_of(files), batch_size=5)
    if keras.backend.backend() == "tensorflow":
        # tf.data runs the dataset in its own thread and re-raises what it
        # raises as an UnknownError whose message holds the Python traceback,
        # notes included: the type is lost, the cause is not.
        with pytest.raises(Exception) as info:
            dense_model().fit(ds, epochs=1, shuffle=False, verbose=0)
        assert "corrupt file" in str(info.value)
        assert "keras_oom: while loading batch 2" in str(info.value)
        return
    with pytest.raises(Broken) as info:
        dense_model().fit(ds, epochs=1, shuffle=False, verbose=0)
    assert any("batch 2" in note for note in getattr(info.value, "__notes__", []))

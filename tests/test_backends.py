"""Training through both dataset classes on the current Keras backend.

Runs on whatever `KERAS_BACKEND` is (JAX by default, see conftest.py); the
nox sessions `tests-jax`, `tests-torch` and `tests-tensorflow` run it once per
backend. The datasets speak NumPy only, so nothing here is backend-specific
except the last test, which exercises how TensorFlow's adapter reads batches.

The samples are `.npy` files on disk, one per sample, read by a loader that
runs in worker processes (for `PrefetchLoaderDataset`); the loader records
each call as a file, so the tests can count how often each batch was loaded.
"""

from __future__ import annotations

import contextlib
import uuid
import warnings
from collections import Counter
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_oom import LoaderDataset, PrefetchLoaderDataset

BACKEND = keras.backend.backend()
NUM_SAMPLES = 45  # not a multiple of the batch size: a short last batch
FEATURES = 4
BATCH = 8

KINDS = ["LoaderDataset", "PrefetchLoaderDataset"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """`NUM_SAMPLES` samples as `.npy` files, with a linear target."""
    root = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_SAMPLES, FEATURES)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], dtype="float32"))[:, None]
    paths = []
    for i, row in enumerate(x):
        path = root / f"sample-{i:03d}.npy"
        np.save(path, row)
        paths.append(str(path))
    return np.array(paths), x, y


def make_loader(log_dir: Path | None = None):
    """A loader reading the batch's files; with `log_dir`, it logs each call.

    Built in a function so that cloudpickle ships it by value: a worker that
    starts as a fresh interpreter then need not import this test module.
    """

    def load(paths):
        if log_dir is not None:
            names = " ".join(Path(p).stem for p in paths)
            (log_dir / f"{uuid.uuid4().hex}.txt").write_text(names)
        return np.stack([np.load(p) for p in paths])

    return load


def make_dataset(kind, loader, ids, labels=None, **kwargs):
    if kind == "PrefetchLoaderDataset":
        return PrefetchLoaderDataset(loader, ids, labels, num_workers=2, **kwargs)
    return LoaderDataset(loader, ids, labels, **kwargs)


def closing(ds):
    """Closes a `PrefetchLoaderDataset` on exit; a `LoaderDataset` owns nothing."""
    if isinstance(ds, PrefetchLoaderDataset):
        return ds
    return contextlib.nullcontext(ds)


def make_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(8), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


def logged_batches(log_dir: Path) -> Counter:
    """How often each batch (as the tuple of its sample names) was loaded."""
    return Counter(tuple(p.read_text().split()) for p in log_dir.glob("*.txt"))


def out_of_order_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "out of order" in str(w.message)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", KINDS)
def test_fit_evaluate_predict(kind, data):
    paths, x, y = data
    model = make_model()
    initial = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    ds = make_dataset(
        kind, make_loader(), paths, y, batch_size=BATCH, shuffle=True, seed=1
    )
    with closing(ds):
        history = model.fit(ds, epochs=4, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 4
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]

    eval_ds = make_dataset(kind, make_loader(), paths, y, batch_size=BATCH)
    with closing(eval_ds):
        loss = model.evaluate(eval_ds, verbose=0)
    assert loss == pytest.approx(model.evaluate(x, y, batch_size=BATCH, verbose=0))
    assert loss < initial

    # Predictions come back in the order of `sample_ids`, here scrambled.
    order = np.random.default_rng(2).permutation(NUM_SAMPLES)
    pred_ds = make_dataset(kind, make_loader(), paths[order], batch_size=BATCH)
    with closing(pred_ds):
        predicted = model.predict(pred_ds, verbose=0)
    assert predicted.shape == (NUM_SAMPLES, 1)
    expected = model.predict(x[order], batch_size=BATCH, verbose=0)
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-5)


class RecordingDataset(PrefetchLoaderDataset):
    """Notes which `(epoch, batch)` Keras asks for, in this process."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests = []

    def __getitem__(self, index):
        self.requests.append((self.epoch, index))
        return super().__getitem__(index)


@pytest.mark.timeout(180)
def test_in_order_fit_loads_each_batch_once_without_warning(data, tmp_path):
    """fit(shuffle=False) reads in order: no warning, no batch loaded twice;
    training epoch e reads the dataset's epoch e, and evaluate / predict
    afterwards read the next epoch without advancing it."""
    paths, _, y = data
    log_dir = tmp_path / "calls"
    log_dir.mkdir()
    ds = RecordingDataset(
        make_loader(log_dir),
        paths,
        y,
        batch_size=BATCH,
        shuffle=True,
        seed=3,
        num_workers=2,
    )
    model = make_model()
    with closing(ds), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(ds, epochs=3, shuffle=False, verbose=0)
        fit_loads = logged_batches(log_dir)
        fit_requests = list(ds.requests)
        fit_stats = ds.stats()
        assert ds.epoch == 3
        model.evaluate(ds, verbose=0)
        model.predict(ds, verbose=0)
        assert ds.epoch == 3  # evaluate and predict do not advance it
    assert out_of_order_warnings(caught) == []
    twice = {batch: n for batch, n in fit_loads.items() if n > 1}
    assert not twice, f"batches loaded more than once: {twice}"
    reference = LoaderDataset(
        make_loader(), paths, batch_size=BATCH, shuffle=True, seed=3
    )
    requested = set(fit_requests)
    for epoch in range(3):  # every training epoch read all of its batches
        assert all((epoch, i) in requested for i in range(len(ds))), epoch
    assert {e for e, _ in requested} == {0, 1, 2}
    for epoch, index in sorted(requested):
        reference.set_epoch(epoch)
        names = tuple(Path(p).stem for p in reference.batch_ids(index))
        assert names in fit_loads, (epoch, index)
    # Every load was delivered, dropped as unused look-ahead, or still in
    # flight at the end; re-reads are served without a second load.
    assert fit_stats["batches"] == len(fit_requests)
    assert (
        sum(fit_loads.values())
        <= fit_stats["batches"] + fit_stats["discarded"] + ds.num_workers
    )
    # evaluate and predict both read epoch 3, each batch once per pass.
    after = set(ds.requests[len(fit_requests) :])
    assert {e for e, _ in after} == {3}


@pytest.mark.timeout(180)
@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="exercises TensorFlow's PyDatasetAdapter.get_tf_dataset; the "
    f"backend is {BACKEND} (run `nox -s tests-tensorflow`)",
)
def test_tensorflow_shape_inference_reads_are_not_loaded_again(data, tmp_path):
    """TF reads batches 0 and 1 to infer the signature, then all from a tf.data
    thread: the re-reads must come from the dataset's recent batches, and must
    not count as out-of-order requests."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import (
        PyDatasetAdapter,
    )

    paths, _, y = data
    log_dir = tmp_path / "calls"
    log_dir.mkdir()
    # Shuffled, so that the look-ahead into the next epoch loads other batches.
    ds = RecordingDataset(
        make_loader(log_dir), paths, y, batch_size=BATCH, shuffle=True, seed=5
    )
    with closing(ds), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = PyDatasetAdapter(ds, shuffle=False)
        adapter.on_epoch_begin()
        batches = [(bx.numpy(), by.numpy()) for bx, by in adapter.get_tf_dataset()]
        adapter.on_epoch_end()
        stats = ds.stats()
    assert out_of_order_warnings(caught) == []
    assert len(batches) == len(ds)
    expected = LoaderDataset(
        make_loader(), paths, y, batch_size=BATCH, shuffle=True, seed=5
    )
    for (bx, by), i in zip(batches, range(len(expected)), strict=True):
        ex, ey = expected[i]
        np.testing.assert_array_equal(bx, ex)
        np.testing.assert_array_equal(by, ey)
    loads = logged_batches(log_dir)
    assert max(loads.values()) == 1, (loads, ds.requests, stats)
    # One epoch read (plus the two early reads): every batch loaded once.
    assert stats["batches"] == len(ds) + 2
    assert stats["hits"] >= 2
    assert sum(loads.values()) <= len(ds) + ds.num_workers


def make_slow_batch_loader(log_dir: Path, slow_first_id: int, seconds: float):
    """Logs each call by its first id; the batch starting at `slow_first_id`
    takes `seconds`."""

    def load(ids):
        (log_dir / f"{ids[0]}-{uuid.uuid4().hex}").touch()
        if ids[0] == slow_first_id:
            import time

            time.sleep(seconds)
        return ids

    return load


@pytest.mark.timeout(60)
def test_rereads_like_tensorflows_do_not_load_again(tmp_path):
    """The read pattern of TensorFlow's adapter, without TensorFlow: batches
    0 and 1 (shape inference), then 0, 1, 2... (tf.data). When batch 2 comes
    back before batch 1, a worker is idle at the re-read of batch 0; it must
    not be given batch 1 again, which is among the recent batches."""
    loader = make_slow_batch_loader(tmp_path, slow_first_id=4, seconds=0.3)
    with (
        PrefetchLoaderDataset(loader, np.arange(40), batch_size=4, num_workers=2) as ds,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        for i in [0, 1, 0, 1, 2, 3]:
            np.testing.assert_array_equal(ds[i], np.arange(4 * i, 4 * i + 4))
        stats = ds.stats()
    assert out_of_order_warnings(caught) == []
    loads = Counter(int(p.name.split("-")[0]) // 4 for p in tmp_path.iterdir())
    assert stats["batches"] == 6
    assert loads[1] == 1, f"batch 1 loaded {loads[1]} times: {sorted(loads.items())}"
    assert all(n == 1 for n in loads.values()), loads

"""Contenders: every way of feeding batches that the benchmark compares.

All share one interface (`Contender`): a `name`, the workload kinds it runs,
`unavailable()` (why it cannot run here, e.g. an optional package is missing),
`setup(workload, data)`, `epoch()` yielding one epoch's batches, and
`teardown()` returning the contender's own statistics. `benchmarks.measure`
runs each contender in a fresh interpreter, so that no contender inherits
another's threads, imports or memory.

To add one: subclass `Contender`, give it a unique `name`, and list it in
`CONTENDERS`. The pool's best configuration has its place ready below
(`PoolBest`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator
from typing import Any

import numpy as np

from benchmarks.workloads import (
    CROP,
    FOLDER_SIDE,
    ImageBatchLoader,
    MemmapLoader,
    SampleLoader,
    Workload,
)

NUM_WORKERS = 2
KERAS_THREADS = 4
# Threads inside each pool worker for the best configuration: JPEG decoders
# release the GIL, so a worker can decode several images at once.
THREADS_PER_WORKER = 2

SERIAL = "serial LoaderDataset"
POOL = "PrefetchLoaderDataset (2 workers)"
POOL_BEST = "PrefetchLoaderDataset, best configuration"
KERAS_MP = "Keras PyDataset (2 processes)"
KERAS_TH = "Keras PyDataset (4 threads)"
TORCH = "torch DataLoader (2 workers)"
TFDATA = "tf.data (AUTOTUNE, TF decoder)"
GRAIN = "Grain mp_prefetch (2 workers)"
KERAS_FOLDER_TF = 'Keras image_dataset_from_directory, format="tf"'
KERAS_FOLDER_GRAIN = 'Keras image_dataset_from_directory, format="grain"'
OOM_FOLDER = "keras-oom image_dataset_from_directory (2 workers)"
RAY = "PrefetchLoaderDataset, RayExecutor (2 actors)"


@dataclasses.dataclass(frozen=True)
class Data:
    """Where a run's data lives: the rows' `.npy` file, the JPEG files, the folder."""

    rows_path: str = ""
    jpeg_paths: tuple[str, ...] = ()
    folder: str = ""  # the JPEG files again, in class folders


def batch_loader(w: Workload, data: Data) -> Any:
    """The workload's `loader(ids)`, shared by the batch-level contenders."""
    if w.kind == "images":
        return ImageBatchLoader(list(data.jpeg_paths), w.decoder)
    return MemmapLoader(data.rows_path, sleep=w.sleep, cpu_passes=w.cpu_passes)


def sample_loader(w: Workload, data: Data) -> SampleLoader:
    """The image workload's `sample_loader(i, rng)`, for per-sample contenders."""
    return SampleLoader(list(data.jpeg_paths), w.decoder)


def batch_ids(w: Workload, i: int) -> np.ndarray:
    return np.arange(i * w.batch_size, (i + 1) * w.batch_size)


class Contender:
    """One way of loading a workload's batches. Subclasses fill in the steps."""

    name = ""
    kinds: tuple[str, ...] = ("rows", "images")
    # Python packages the contender imports; missing ones skip it with a reason.
    requires: tuple[str, ...] = ()

    def unavailable(self) -> str | None:
        """Why this contender cannot run here, or None if it can."""
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"`{module}` is not installed"
        return None

    def preload(self) -> None:
        """Imports what `setup` needs, before the clock starts."""
        import keras_oom.prefetch  # noqa: F401  (imports Keras)

        for module in self.requires:
            importlib.import_module(module)

    def setup(self, w: Workload, data: Data) -> None:
        """Builds the pipeline (timed: the first batch counts from here)."""
        raise NotImplementedError

    def epoch(self) -> Iterator[Any]:
        """Yields the batches of one epoch."""
        raise NotImplementedError

    def teardown(self) -> dict[str, float]:
        """Releases everything; returns the contender's own statistics."""
        return {}

    note = ""


class Serial(Contender):
    """`LoaderDataset`, read with `ds[i]` in a loop."""

    name = SERIAL

    def setup(self, w: Workload, data: Data) -> None:
        from keras_oom import LoaderDataset

        self.ds = LoaderDataset(
            batch_loader(w, data), np.arange(w.num_samples), batch_size=w.batch_size
        )

    def epoch(self) -> Iterator[Any]:
        for i in range(len(self.ds)):
            yield self.ds[i]
        self.ds.on_epoch_end()


class Pool(Contender):
    """`PrefetchLoaderDataset(loader, ids, batch_size, num_workers=2)`."""

    name = POOL

    def make_loader(self, w: Workload, data: Data) -> Any:
        return batch_loader(w, data)

    def setup(self, w: Workload, data: Data) -> None:
        from keras_oom import PrefetchLoaderDataset

        try:
            from keras_oom.launch import default_start_method

            self.note = f"workers started by {default_start_method()!r}"
        except ImportError:  # an internal: the note is only informative
            self.note = ""
        self.ds = PrefetchLoaderDataset(
            self.make_loader(w, data),
            np.arange(w.num_samples),
            batch_size=w.batch_size,
            num_workers=NUM_WORKERS,
        )

    def epoch(self) -> Iterator[Any]:
        # The training process's own CPU time per batch, from the second
        # epoch on (start-up left out): what feeding costs the trainer.
        self.epochs_started = getattr(self, "epochs_started", 0) + 1
        if self.epochs_started == 2:
            self.own_cpu_start, self.own_batches = cpu_seconds(), 0
        for i in range(len(self.ds)):
            yield self.ds[i]
            if self.epochs_started >= 2:
                self.own_batches += 1
        self.ds.on_epoch_end()

    def teardown(self) -> dict[str, float]:
        try:
            st = self.ds.stats()
            out = {
                "hit_rate": st["hits"] / st["batches"],
                "utilization": float(
                    np.mean([w["utilization"] for w in st["workers"]])
                ),
                "wait_share": st["wait_seconds"] / st["elapsed_seconds"],
                "load_ms": 1e3 * st["load_seconds"] / st["batches"],
            }
        except (AttributeError, KeyError, TypeError, ZeroDivisionError):
            out = {}  # stats() changed shape: the table of pool stats is optional
        if getattr(self, "own_batches", 0):
            used = cpu_seconds() - self.own_cpu_start
            out["train_cpu_ms_per_batch"] = 1e3 * used / self.own_batches
        self.ds.close()
        return out


class PoolBest(Pool):
    """The pool in its best configuration (issue 11, items 1 and 2).

    >>> LEAD: THE PLACE FOR THE BEST CONFIGURATION. <<<
    Images: a per-sample loader stacked into zero-copy batches with threads
    inside each worker; rows: the memmap copied straight into a zero-copy
    batch. `make_loader` below is written against the API announced in the
    issue (`keras_oom.stack_samples(sample_loader, threads=N)` returning a
    batch loader, `keras_oom.batch_array(shape, dtype)` an allocator); adjust
    the two calls to the final signatures. Until both names exist, the
    contender is skipped with that reason, and the targets fall back to
    `PrefetchLoaderDataset (2 workers)`.
    """

    name = POOL_BEST
    api = ("stack_samples", "batch_array")

    def unavailable(self) -> str | None:
        import keras_oom

        missing = [n for n in self.api if not hasattr(keras_oom, n)]
        if missing:
            names = ", ".join(f"`keras_oom.{n}`" for n in missing)
            return f"{names} not there yet (issue 11, items 1-2)"
        return None

    def make_loader(self, w: Workload, data: Data) -> Any:
        import keras_oom

        if w.kind == "images":
            return keras_oom.stack_samples(
                sample_loader(w, data), threads=THREADS_PER_WORKER
            )
        return ZeroCopyMemmapLoader(data.rows_path, w.sleep, w.cpu_passes)


class ZeroCopyMemmapLoader(MemmapLoader):
    """`MemmapLoader` that copies the rows straight into a zero-copy batch."""

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        import keras_oom

        if self._mm is None:
            self._mm = np.load(self.path, mmap_mode="r")
        ids = np.asarray(ids)
        out = keras_oom.batch_array((len(ids), self._mm.shape[1]), self._mm.dtype)
        # mode="clip": with the default mode="raise", NumPy buffers `out`,
        # which would add the very copy batch_array exists to avoid.
        np.take(self._mm, ids, axis=0, out=out, mode="clip")
        if self.sleep or self.cpu_passes:
            import time

            time.sleep(self.sleep)
            for _ in range(self.cpu_passes):
                np.sqrt(out * out + 1.0, out=out)
        return out


class _KerasBatches:
    """Builds a plain `keras.utils.PyDataset` over the workload's loader."""

    @staticmethod
    def make(loader: Any, w: Workload, **kwargs: Any) -> Any:
        import keras

        class KerasBatches(keras.utils.PyDataset):
            def __init__(self) -> None:
                super().__init__(**kwargs)

            def __len__(self) -> int:
                return w.batches_per_epoch

            def __getitem__(self, i: int) -> np.ndarray:
                return loader(batch_ids(w, i))

        return KerasBatches()


class KerasProcesses(Contender):
    """A `keras.utils.PyDataset` driven by Keras's adapter, as `fit` drives it."""

    name = KERAS_MP
    options: dict[str, Any] = {"workers": NUM_WORKERS, "use_multiprocessing": True}

    def setup(self, w: Workload, data: Data) -> None:
        from keras.src.trainers.data_adapters.py_dataset_adapter import (
            PyDatasetAdapter,
        )

        ds = _KerasBatches.make(batch_loader(w, data), w, **self.options)
        self.adapter = PyDatasetAdapter(ds, shuffle=False)

    def epoch(self) -> Iterator[Any]:
        self.adapter.on_epoch_begin()
        yield from self.adapter.get_numpy_iterator()
        self.adapter.on_epoch_end()

    def teardown(self) -> dict[str, float]:
        if self.adapter.enqueuer is not None:
            self.adapter.enqueuer.stop()
        return {}


class KerasThreads(KerasProcesses):
    name = KERAS_TH
    options = {"workers": KERAS_THREADS, "use_multiprocessing": False}


class Torch(Contender):
    """`torch.utils.data.DataLoader(num_workers=2)` with default settings.

    Rows: index i is the whole batch i (`batch_size=None`). Images: a
    map-style dataset of samples, `batch_size=64`, default collate. Default
    settings mean `persistent_workers=False`: workers restart every epoch.
    """

    name = TORCH
    requires = ("torch", "torch.utils.data")

    def setup(self, w: Workload, data: Data) -> None:
        import torch.utils.data

        if w.kind == "images":
            sample = sample_loader(w, data)

            class Samples(torch.utils.data.Dataset):
                rng: np.random.Generator | None = None

                def __len__(self) -> int:
                    return w.num_samples

                def __getitem__(self, i: int) -> np.ndarray:
                    if self.rng is None:  # one generator per worker process
                        self.rng = np.random.default_rng()
                    return sample(i, self.rng)

            self.dl = torch.utils.data.DataLoader(
                Samples(), batch_size=w.batch_size, num_workers=NUM_WORKERS
            )
        else:
            loader = batch_loader(w, data)

            class Batches(torch.utils.data.Dataset):
                def __len__(self) -> int:
                    return w.batches_per_epoch

                def __getitem__(self, i: int) -> np.ndarray:
                    return loader(batch_ids(w, i))

            self.dl = torch.utils.data.DataLoader(
                Batches(), batch_size=None, num_workers=NUM_WORKERS
            )

    def epoch(self) -> Iterator[Any]:
        return iter(self.dl)


class TfData(Contender):
    """`tf.data`: list files, map(read + TF's JPEG decoder + crop + flip), batch.

    Uses TensorFlow's own decoder whatever the workload's decoder: it is the
    pipeline a TensorFlow user writes.
    """

    name = TFDATA
    kinds = ("images",)
    requires = ("tensorflow",)

    def setup(self, w: Workload, data: Data) -> None:
        import tensorflow as tf

        def load(path: Any) -> Any:
            img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
            img = tf.image.random_crop(img, [CROP, CROP, 3])
            return tf.image.random_flip_left_right(img)

        directory = data.jpeg_paths[0].rsplit("/", 1)[0]
        self.ds = (
            tf.data.Dataset.list_files(f"{directory}/*.jpg", shuffle=False)
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(w.batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )

    def epoch(self) -> Iterator[Any]:
        return self.ds.as_numpy_iterator()


class Grain(Contender):
    """Grain: MapDataset.random_map(sample) .batch .mp_prefetch(2 workers).

    One iterator over repeated epochs, so that Grain's worker processes start
    once (as with the pool); epochs are cut from it by count.
    """

    name = GRAIN
    kinds = ("images",)
    requires = ("grain", "absl.flags")

    def setup(self, w: Workload, data: Data) -> None:
        import grain
        from absl import flags

        # Grain reads absl flags, which only absl's app.run parses otherwise.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        sample = sample_loader(w, data)
        self.per_epoch = w.batches_per_epoch
        ds = (
            grain.MapDataset.range(w.num_samples)
            .seed(0)
            .random_map(lambda i, rng: sample(i, rng))
            .batch(w.batch_size)
            .repeat()
            .to_iter_dataset()
            .mp_prefetch(grain.MultiprocessingOptions(num_workers=NUM_WORKERS))
        )
        self.it = iter(ds)

    def epoch(self) -> Iterator[Any]:
        for _ in range(self.per_epoch):
            yield next(self.it)

    def teardown(self) -> dict[str, float]:
        close = getattr(self.it, "close", None)
        if close is not None:
            close()
        del self.it
        return {}


def cpu_seconds(pids: Any = ()) -> float:
    """CPU seconds (user + system) of this process and of the processes `pids`."""
    import os
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class FolderContender(Contender):
    """An `image_dataset_from_directory`, with its CPU cost per image.

    Throughput on a shared machine depends on what else runs; the CPU time
    an image costs (this process and its workers, from the second epoch on,
    so that start-up and compilation are left out) does much less.
    """

    kinds = ("folder",)

    def setup(self, w: Workload, data: Data) -> None:
        self.batch_size = w.batch_size
        self.epochs_started = 0
        self.images = 0
        self.cpu_start = 0.0
        self.ds = self.make(w, data)

    def make(self, w: Workload, data: Data) -> Any:
        raise NotImplementedError

    def batches(self) -> Iterator[Any]:
        raise NotImplementedError

    def pids(self) -> Any:
        return ()

    def epoch(self) -> Iterator[Any]:
        self.epochs_started += 1
        if self.epochs_started == 2:
            self.cpu_start = cpu_seconds(self.pids())
        for batch in self.batches():
            if self.epochs_started >= 2:
                self.images += self.batch_size
            yield batch

    def teardown(self) -> dict[str, float]:
        if not self.images:
            return {}
        used = cpu_seconds(self.pids()) - self.cpu_start
        return {"cpu_ms_per_image": 1e3 * used / self.images}


class KerasFolder(FolderContender):
    """Keras's `image_dataset_from_directory(format="tf")`, as a user calls it.

    The image folder workload (issue 15): Keras's own tf.data pipeline
    (TensorFlow's decoder and resize, AUTOTUNE parallelism).
    """

    name = KERAS_FOLDER_TF
    requires: tuple[str, ...] = ("tensorflow",)
    format = "tf"

    def make(self, w: Workload, data: Data) -> Any:
        import keras

        return keras.utils.image_dataset_from_directory(
            data.folder,
            image_size=(FOLDER_SIDE, FOLDER_SIDE),
            batch_size=w.batch_size,
            seed=0,
            verbose=False,
            format=self.format,
        )

    def batches(self) -> Iterator[Any]:
        if self.format == "tf":
            return self.ds.as_numpy_iterator()
        return iter(self.ds)


class KerasFolderGrain(KerasFolder):
    """Keras's `format="grain"`: Pillow and `keras.ops.image.resize`, in process."""

    name = KERAS_FOLDER_GRAIN
    requires = ("grain", "PIL")
    format = "grain"


class OomFolder(FolderContender):
    """keras-oom's `image_dataset_from_directory(..., num_workers=2)`."""

    name = OOM_FOLDER
    requires = ("PIL", "cv2")

    def make(self, w: Workload, data: Data) -> Any:
        from keras_oom import image_dataset_from_directory

        return image_dataset_from_directory(
            data.folder,
            image_size=(FOLDER_SIDE, FOLDER_SIDE),
            batch_size=w.batch_size,
            seed=0,
            verbose=False,
            num_workers=NUM_WORKERS,
        )

    def pids(self) -> Any:
        return self.ds.worker_pids

    def batches(self) -> Iterator[Any]:
        for i in range(len(self.ds)):
            yield self.ds[i]
        self.ds.on_epoch_end()

    def teardown(self) -> dict[str, float]:
        out = super().teardown()
        st = self.ds.stats()
        out["utilization"] = float(np.mean([w["utilization"] for w in st["workers"]]))
        out["wait_share"] = st["wait_seconds"] / st["elapsed_seconds"]
        self.ds.close()
        return out


# In table order. The best configuration sits right after the plain pool.
class RayPool(Pool):
    """`PrefetchLoaderDataset(..., executor=RayExecutor())` (issue 17).

    The pool's loader in 2 Ray actors (`in_flight=2`) on a local Ray
    instance with `NUM_WORKERS` CPUs, started before the clock (a cluster
    is already up when a user trains on one): the cost of going through
    Ray's object store and scheduler instead of the local pool's sockets
    and shared memory, on the same machine.
    """

    name = RAY
    kinds = ("images",)
    requires = ("ray",)

    def preload(self) -> None:
        super().preload()
        import ray

        if not ray.is_initialized():
            ray.init(
                num_cpus=NUM_WORKERS,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )

    def setup(self, w: Workload, data: Data) -> None:
        from keras_oom import PrefetchLoaderDataset
        from keras_oom.ray import RayExecutor

        self.note = "2 actors of 1 CPU, in_flight=2, local Ray instance"
        self.ds = PrefetchLoaderDataset(
            self.make_loader(w, data),
            np.arange(w.num_samples),
            batch_size=w.batch_size,
            num_workers=NUM_WORKERS,
            executor=RayExecutor(num_cpus=1, in_flight=2),
        )

    def teardown(self) -> dict[str, float]:
        out = super().teardown()  # closes the dataset: kills its actors
        import ray

        ray.shutdown()  # the instance preload() started, not the dataset's
        return out


CONTENDERS: list[type[Contender]] = [
    Serial,
    Pool,
    PoolBest,
    KerasProcesses,
    KerasThreads,
    Torch,
    TfData,
    Grain,
    KerasFolder,
    KerasFolderGrain,
    OomFolder,
    RayPool,
]
BY_NAME = {c.name: c for c in CONTENDERS}

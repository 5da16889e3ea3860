"""A real multi-process run: two JAX processes train one model on their shards.

Starts `examples/multiprocess_jax.py` twice on this machine, joined by
`jax.distributed.initialize` over a loopback coordinator, each process
training with `keras.distribution.DataParallel` on its own shard through
`PrefetchLoaderDataset(shard="auto")`. Each process writes the sample ids its
dataset handed to Keras in every epoch; the shards of each epoch must be
disjoint and cover the data, and both processes must finish.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_oom

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "multiprocess_jax.py"
NUM_PROCESSES = 2
EPOCHS = 2
BATCH = 8  # per process

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="starts JAX processes joined by jax.distributed; the Keras backend "
    f"is {keras.backend.backend()} (run `nox -s tests-jax`)",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_epochs(out_dir: Path, rank: int) -> dict[int, list[np.ndarray]]:
    """Epoch -> the batches (as id arrays) process `rank` delivered."""
    epochs = {}
    for path in out_dir.glob(f"ids-p{rank}-e*.txt"):
        epoch = int(path.stem.rsplit("-e", 1)[1])
        lines = path.read_text().splitlines()
        epochs[epoch] = [np.array(line.split(), dtype=int) for line in lines]
    return epochs


@pytest.mark.timeout(300)
def test_two_jax_processes_train_on_disjoint_shards(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import multiprocess_jax as example
    finally:
        sys.path.pop(0)
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    # The children import the same keras_oom as this test.
    package_root = str(Path(keras_oom.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root, *filter(None, [env.get("PYTHONPATH")])]
    )
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for rank in range(NUM_PROCESSES):
        log = open(tmp_path / f"log-p{rank}.txt", "w")  # noqa: SIM115
        procs.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        str(EXAMPLE),
                        "--coordinator",
                        coordinator,
                        "--num-processes",
                        str(NUM_PROCESSES),
                        "--process-id",
                        str(rank),
                        "--epochs",
                        str(EPOCHS),
                        "--batch-size",
                        str(BATCH),
                        "--out-dir",
                        str(tmp_path),
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=240))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = {
        rank: (tmp_path / f"log-p{rank}.txt").read_text()[-3000:]
        for rank in range(NUM_PROCESSES)
    }
    assert codes == [0] * NUM_PROCESSES, f"exit codes {codes}; logs: {logs}"

    results = [
        json.loads((tmp_path / f"result-p{rank}.json").read_text())
        for rank in range(NUM_PROCESSES)
    ]
    assert [r["shard"] for r in results] == [[0, 2], [1, 2]]
    steps = example.NUM_SAMPLES // NUM_PROCESSES // BATCH
    assert [r["steps"] for r in results] == [steps] * NUM_PROCESSES
    # One model: the loss is the global one, and the replicas stay equal.
    assert results[0]["loss"] == pytest.approx(results[1]["loss"])
    assert results[0]["weights"] == pytest.approx(results[1]["weights"])
    assert len(results[0]["loss"]) == EPOCHS

    per_rank = [read_epochs(tmp_path, rank) for rank in range(NUM_PROCESSES)]
    assert per_rank[0].keys() == per_rank[1].keys()
    # Training epoch e reads the dataset's epoch e in full; Keras's first
    # fit also reads one batch of epoch 0 before it, to build the loss.
    assert sorted(per_rank[0]) == list(range(EPOCHS))
    for p in per_rank:
        assert [len(p[e]) for e in range(EPOCHS)] in (
            [steps] * EPOCHS,
            [steps + 1] + [steps] * (EPOCHS - 1),
        )
    everything = np.arange(example.NUM_SAMPLES)
    orders = []
    for epoch in range(EPOCHS):
        shards = [np.concatenate(p[epoch][-steps:]) for p in per_rank]
        assert all(len(s) == example.NUM_SAMPLES // NUM_PROCESSES for s in shards)
        assert not set(shards[0]) & set(shards[1]), f"epoch {epoch}: overlap"
        np.testing.assert_array_equal(np.sort(np.concatenate(shards)), everything)
        orders.append(shards[0])
    # Shuffled anew each epoch.
    assert not np.array_equal(orders[0], orders[1])

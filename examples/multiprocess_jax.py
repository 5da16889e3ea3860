"""Data-parallel training across processes with JAX and `shard="auto"`.

Every process runs this same script: it joins the JAX cluster, reads only its
shard of every epoch through `PrefetchLoaderDataset(shard="auto")`, and trains
the same model with `keras.distribution.DataParallel`. Keras assembles each
step's global batch from the processes' local batches
(`jax.make_array_from_process_local_data`), so the global batch is
`batch_size * num_processes`.

On one machine, start both processes yourself (CPU, loopback coordinator):

    python examples/multiprocess_jax.py --launch 2

or one by one, each in its own shell:

    python examples/multiprocess_jax.py --coordinator 127.0.0.1:12355 \
        --num-processes 2 --process-id 0
    python examples/multiprocess_jax.py --coordinator 127.0.0.1:12355 \
        --num-processes 2 --process-id 1

On a cluster, run one process per host with `--coordinator` set to host 0's
address (see docs/distributed.md). With `--out-dir`, each process writes the
sample ids its dataset delivered in each epoch to
`OUT_DIR/ids-p{process}-e{epoch}.txt` (tests/test_multiprocess_jax.py checks
that the shards are disjoint and cover the data).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

NUM_SAMPLES = 96
FEATURES = 8


def load(ids):
    """Stands in for reading files: each sample's features follow from its id."""
    import numpy as np

    angles = ids[:, None].astype("float32") * (np.arange(FEATURES) + 1) / 97.0
    return np.sin(angles).astype("float32")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, argv: list[str], timeout: float) -> int:
    """Starts `num_processes` copies of this script on this machine."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--coordinator",
                coordinator,
                "--num-processes",
                str(num_processes),
                "--process-id",
                str(i),
                *argv,
            ]
        )
        for i in range(num_processes)
    ]
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    print(f"process exit codes: {codes}")
    return max(codes, key=abs)


def train(args: argparse.Namespace) -> None:
    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    # CPU collectives across processes need gloo, chosen before initialize.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras
    import numpy as np

    from keras_oom import PrefetchLoaderDataset

    # Joins the cluster (jax.distributed.initialize) and agrees on one seed.
    keras.distribution.initialize(
        job_addresses=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    # auto_shard_dataset=False: the dataset shards itself (shard="auto");
    # Keras would otherwise accept only a tf.data.Dataset here.
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(
            devices=keras.distribution.list_devices(), auto_shard_dataset=False
        )
    )
    rank, size = jax.process_index(), jax.process_count()

    ids = np.arange(NUM_SAMPLES)
    labels = (load(ids).sum(axis=1) > 0).astype("float32")

    out_dir = Path(args.out_dir) if args.out_dir else None

    class RecordingDataset(PrefetchLoaderDataset):
        """Writes down which ids it hands to Keras in each epoch."""

        def __getitem__(self, index):
            if out_dir is not None:
                path = out_dir / f"ids-p{rank}-e{self.epoch}.txt"
                with open(path, "a") as f:
                    f.write(" ".join(map(str, self.batch_ids(index))) + "\n")
            return super().__getitem__(index)

    # The same seed everywhere: every process draws the same epoch order
    # and keeps its own part of it.
    with RecordingDataset(
        load,
        ids,
        labels=labels,
        batch_size=args.batch_size,
        shuffle=True,
        seed=0,
        shard="auto",
        num_workers=2,
    ) as ds:
        assert ds.shard == (rank, size), ds.shard
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(1, activation="sigmoid"),
            ]
        )
        model.compile(optimizer="adam", loss="binary_crossentropy")
        history = model.fit(ds, epochs=args.epochs, shuffle=False, verbose=0)
    losses = [float(v) for v in history.history["loss"]]
    weights = float(sum(np.abs(w).sum() for w in model.get_weights()))
    print(
        f"process {rank}/{size}: shard {ds.shard}, {len(ds)} steps/epoch, "
        f"loss {[round(v, 4) for v in losses]}"
    )
    if out_dir is not None:
        # Data-parallel replicas must end with the same weights.
        result = {
            "shard": list(ds.shard),
            "steps": len(ds),
            "loss": losses,
            "weights": weights,
            "epochs_read": ds.epoch,
        }
        (out_dir / f"result-p{rank}.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--launch",
        type=int,
        metavar="N",
        help="start N processes on this machine and wait",
    )
    parser.add_argument("--coordinator", help="host:port of process 0")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="per-process batch size"
    )
    parser.add_argument("--out-dir", help="where to write the delivered ids")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="with --launch: seconds to wait for the processes",
    )
    args = parser.parse_args(argv)
    if args.launch:
        rest = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
        if args.out_dir:
            rest += ["--out-dir", args.out_dir]
        return launch(args.launch, rest, args.timeout)
    if args.coordinator is None or args.num_processes is None:
        parser.error(
            "give --launch N, or --coordinator, --num-processes and --process-id"
        )
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the example scripts as a user would: a fresh interpreter, real files.

The examples are documentation; this keeps them working. Each runs in a
subprocess on the backend of this test run (`KERAS_BACKEND`), on a small
generated data set, and must exit 0, print what it promises, and leave no
worker process behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import _procs
import pytest

EXAMPLES = _procs.REPO / "examples"


# Set in the example's environment, which its workers inherit: how to find
# them once the example has exited and they are no longer our descendants.
MARKER = "KERAS_OOM_EXAMPLE_RUN"


def processes_marked(token: str) -> list[int]:
    """Live processes whose environment holds MARKER=token."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0") and _procs.alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_unmarked(token: str, grace: float = 3.0) -> list[int]:
    """Waits up to `grace` seconds for the marked processes to end."""
    deadline = time.monotonic() + grace
    while (left := processes_marked(token)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def run_example(name: str, *args: str, cwd: Path, token: str, timeout: float = 110):
    env = _procs.script_env()
    # script_env pins JAX; the examples should run on this run's backend.
    env["KERAS_BACKEND"] = os.environ.get("KERAS_BACKEND", "jax")
    env[MARKER] = token
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


@pytest.mark.timeout(120)
def test_images_from_files_trains_predicts_and_cleans_up(tmp_path):
    data = tmp_path / "shapes"
    token = uuid.uuid4().hex
    result = run_example(
        "images_from_files.py",
        "--make-data",
        "150",
        "--data",
        str(data),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        cwd=tmp_path,
        token=token,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    # The data it was asked to make: 150 JPEGs and their labels.
    assert len(list((data / "images").glob("*.jpg"))) == 150
    assert (data / "labels.csv").read_text().count("\n") == 151

    # 150 images, 10% test: 15 paths predicted in one batch of up to 64.
    match = re.search(r"Held-out accuracy: ([0-9.]+) on 15 images", result.stdout)
    assert match, output
    # Three colours, one per class: chance is 1/3 and the model learns
    # colour within an epoch, so this only fails if training did nothing.
    assert float(match.group(1)) > 0.5, output
    assert "Input pipeline:" in result.stdout, output
    assert "Traceback" not in result.stderr, output

    # Its workers ended with it (orphans would no longer descend from us,
    # hence the marker in their environment).
    assert not wait_unmarked(token), "worker processes outlived the example"


# -- recipes for the formats users have (issue 18, items 2 and 6) -------------

RECIPES = [
    # (script, modules it needs, what it must print)
    ("hdf5_rows.py", ("h5py",), ["Unsorted rows, straight from h5py: TypeError"]),
    ("npy_memmap.py", (), []),
    ("parquet_rows.py", ("pyarrow",), []),
    ("npz_folder.py", (), []),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("script", "needs", "prints"), RECIPES, ids=[r[0] for r in RECIPES]
)
def test_recipe_reads_every_shuffled_batch_right_and_trains(
    tmp_path, script, needs, prints
):
    """Kind recipe: each format's example checks every batch of a shuffled
    epoch against the file itself, trains, prints a diagnosis, and leaves
    no worker behind."""
    for module in needs:
        pytest.importorskip(module, reason=f"{script} needs {module} (test extra)")
    token = uuid.uuid4().hex
    result = run_example(script, cwd=tmp_path, token=token)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^Checked \d+ shuffled batches against the", result.stdout, re.M)
    assert re.search(r"^Trained 2 epochs, loss [0-9.]+$", result.stdout, re.M)
    assert result.stdout.rstrip().endswith("OK"), output
    for text in prints:
        assert text in result.stdout, output
    assert "Traceback" not in result.stderr, output
    assert not wait_unmarked(token), "worker processes outlived the example"

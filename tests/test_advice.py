"""Errors and warnings that say what to do (issue 18, items 3 to 5).

- A script without `if __name__ == "__main__":` run with
  `start_method="spawn"` or `"forkserver"`: every worker re-ran the script
  and the run ended in "failed to start 3 times in a row ... see its output
  above"; keras-oom's own message now names the guard.
- A loader defined in the user's script, pickled by value for a fresh
  interpreter, showed `<dynamic-code>` as its file in worker tracebacks.
- A run resumed through `BackupAndRestore` without `SyncEpoch` read
  different data with nothing said.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import _procs
import pytest

UNGUARDED = """
import sys
import numpy as np
from keras_oom import PrefetchLoaderDataset

def load(ids):
    return ids * 2

print("SCRIPT RUNS", flush=True)
ds = PrefetchLoaderDataset(load, np.arange(8), batch_size=2, num_workers=2,
                           start_method=sys.argv[1])
try:
    ds[0]
finally:
    ds.close()
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_unguarded_script_under_spawn_names_the_main_guard(tmp_path, start_method):
    """Kind start-error: a worker that re-imports an unguarded main module
    ends the run at once, with keras-oom's own message naming the missing
    `if __name__ == "__main__":` and the default start method."""
    path = _procs.write_script(tmp_path, UNGUARDED)
    result = subprocess.run(
        [sys.executable, str(path), start_method],
        capture_output=True,
        text=True,
        timeout=100,
        env=_procs.script_env(),
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("keras_oom.errors.WorkerStartError"), output
    assert 'if __name__ == "__main__":' in last, output
    assert "start_method=None" in last, output
    assert str(path) in last, output
    # Broken at the first such death: no retries that re-run the script
    # again (it ran 7 times): the script itself, then one run per worker.
    # (Python 3.11's fork server does not import the main module itself:
    # it asks for a `main_path` key that the preparation data never has.)
    assert result.stdout.count("SCRIPT RUNS") <= 3, output
    assert "failed to start 3 times" not in output, output


UNGUARDED_OWN_PROCESS = """
import multiprocessing
import sys
import numpy as np
from keras_oom import PrefetchLoaderDataset

def load(ids):
    return ids * 2

# The script's own process, started before the dataset: in a re-run inside
# a worker, multiprocessing refuses it ("bootstrapping phase"), so the
# worker dies before keras_oom's code runs there.
helper = multiprocessing.get_context(sys.argv[1]).Process(target=print)
helper.start()
helper.join()
ds = PrefetchLoaderDataset(load, np.arange(8), batch_size=2, num_workers=1,
                           start_method=sys.argv[1])
try:
    ds[0]
finally:
    ds.close()
"""


@pytest.mark.timeout(120)
def test_worker_dying_in_the_reimport_before_keras_oom_still_names_the_guard(
    tmp_path,
):
    """Kind start-error: the re-run fails before it reaches keras_oom (the
    script's own process start, refused while bootstrapping); the start
    error still names the guard and the default start method."""
    path = _procs.write_script(tmp_path, UNGUARDED_OWN_PROCESS)
    result = subprocess.run(
        [sys.executable, str(path), "spawn"],
        capture_output=True,
        text=True,
        timeout=100,
        env=_procs.script_env(),
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "bootstrapping phase" in result.stderr, output  # Python's own text
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("keras_oom.errors.WorkerStartError"), output
    assert 'if __name__ == "__main__":' in last, output
    assert "start_method=None" in last, output


FAILING_LOADER_SCRIPT = """
import sys
import numpy as np
from keras_oom import PrefetchLoaderDataset

def load(ids):
    scaled = ids * 2
    raise ValueError(f"cannot read {scaled[0]}")  # THE FAILING LINE

if __name__ == "__main__":
    with PrefetchLoaderDataset(load, np.arange(8), batch_size=2, num_workers=1,
                               start_method=sys.argv[1]) as ds:
        try:
            ds[0]
        except ValueError as e:
            print("NOTES", *e.__notes__, sep="\\n")
            print("CAUSE", e.__cause__)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["subprocess", "spawn"])
def test_loader_frames_from_the_users_script_name_its_file(tmp_path, start_method):
    """Kind traceback: a loader defined in the user's script travels by value
    (cloudpickle), which named its file `<dynamic-code>` in the worker's
    traceback; the frame names the script and shows the failing line."""
    path = _procs.write_script(tmp_path, FAILING_LOADER_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(path), start_method],
        capture_output=True,
        text=True,
        timeout=100,
        env=_procs.script_env(),
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    frame = f'File "{path}", line 8, in load'
    notes, cause = result.stdout.split("CAUSE", 1)
    assert frame in notes, output  # the loader's frames, in the note
    assert frame in cause, output  # and the full traceback, as the cause
    assert "# THE FAILING LINE" in notes, output  # the source line, too
    assert "<dynamic-code>" not in output, output


# -- a resumed run that would read different data (item 5) ---------------------


def _keras_model():
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _dataset(cls=None, **kwargs):
    import numpy as np

    from keras_oom import LoaderDataset

    ids = np.arange(16)
    cls = cls or LoaderDataset
    return cls(
        _procs.features_loader,
        ids,
        ids * 1.0,
        batch_size=8,
        shuffle=True,
        seed=3,
        **kwargs,
    )


def _fit(ds, callbacks=(), **kwargs):
    model = _keras_model()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(ds, shuffle=False, verbose=0, callbacks=list(callbacks), **kwargs)
    return [w for w in record if "SyncEpoch" in str(w.message)]


@pytest.mark.timeout(60)
def test_backup_and_restore_without_sync_epoch_warns_once(tmp_path):
    """Kind resume-warning: BackupAndRestore in the callbacks and no
    SyncEpoch for the dataset: a resumed run would read other data."""
    import keras

    ds = _dataset()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    found = _fit(ds, [backup], epochs=2)
    found += _fit(ds, [backup], epochs=4)  # the same dataset: no second one
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert "BackupAndRestore" in message and "SyncEpoch(" in message
    assert found[0].category is UserWarning


@pytest.mark.timeout(60)
def test_backup_and_restore_with_sync_epoch_does_not_warn(tmp_path):
    """Kind resume-warning: SyncEpoch for the dataset: nothing to say."""
    import keras

    from keras_oom import SyncEpoch

    ds = _dataset()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    assert _fit(ds, [backup, SyncEpoch(ds)], epochs=2) == []


@pytest.mark.timeout(60)
def test_initial_epoch_ahead_of_the_dataset_warns(tmp_path):
    """Kind resume-warning: fit(initial_epoch=3) on a dataset at epoch 0
    (a new process resuming by hand) reads epoch 0's order as epoch 3."""
    ds = _dataset()
    found = _fit(ds, epochs=4, initial_epoch=3)
    assert len(found) == 1
    message = str(found[0].message)
    assert "epoch 3" in message and "epoch 0" in message
    assert "SyncEpoch(" in message


@pytest.mark.timeout(60)
def test_fit_called_again_epoch_by_epoch_does_not_warn():
    """Kind resume-warning: fit(epochs=1) in a loop starts each at Keras's
    epoch 0 while the dataset moves on: not a resume, no warning."""
    ds = _dataset()
    found = []
    for _ in range(3):
        found += _fit(ds, epochs=1)
    assert found == []
    assert ds.epoch == 3


@pytest.mark.timeout(60)
def test_prefetch_dataset_resumed_without_sync_epoch_warns(tmp_path):
    """Kind resume-warning: the same for PrefetchLoaderDataset."""
    from keras_oom import PrefetchLoaderDataset

    with _dataset(PrefetchLoaderDataset, num_workers=1) as ds:
        found = _fit(ds, epochs=3, initial_epoch=2)
    assert len(found) == 1

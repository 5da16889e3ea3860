"""How local workers start (launch.py): start methods, fork safety, pickling.

Every start method gives the same batches; the default forks only while
forking is safe (no GNU OpenMP pool, no native thread of unknown origin, no
running Python thread, JAX not started) and otherwise starts fresh
interpreters, which need the loader pickled (with cloudpickle) and never
rerun an unguarded script. An explicit `start_method="fork"` forks, with a
warning. Scenarios that depend on what ran in the process run as scripts in
a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import _procs
import numpy as np
import pytest

from keras_oom import LoaderDataset, PrefetchLoaderDataset

pytestmark = pytest.mark.timeout(60)

IDS = np.arange(24)  # batch_size 4: batch k holds ids 4k .. 4k+3


# -- issue 14, Kind B: fork after a thread pool that is not fork-safe ------------

FORK_SAFETY_SCRIPT = """
import os, sys, threading
import numpy as np
import _launch_loaders as L

setup = sys.argv[1]
loader = L.numpy_loader
if setup == "torch":
    import torch
    torch.set_num_threads(2)
    a = torch.rand(300, 300)
    (a @ a).sum()
    loader = L.torch_loader
elif setup == "sklearn":
    loader = L.sklearn_loader
    loader([0])  # scikit-learn's OpenMP pool starts here
elif setup == "gomp":
    L.gomp_parallel()
    loader = L.gomp_loader
elif setup == "native-thread":
    L.start_native_thread()
elif setup == "numpy":
    loader([0])  # OpenBLAS's pool runs (OPENBLAS_NUM_THREADS=2)
elif setup == "ended-python-thread":
    t = threading.Thread(target=loader, args=([0],))
    t.start()
    t.join()
print("THREADS", len(os.listdir("/proc/self/task")), flush=True)

from keras_oom import PrefetchLoaderDataset
from keras_oom.launch import default_start_method

print("METHOD", default_start_method(), flush=True)
with PrefetchLoaderDataset(loader, np.arange(8), batch_size=4, num_workers=1,
                           timeout=20) as ds:
    print("BATCH", ds[1].tolist(), flush=True)
"""


def run_setup(tmp_path, script: str, setup: str) -> dict[str, str]:
    """Runs `script` with argument `setup` in a fresh interpreter.

    Returns its `KEY value` lines as a dict; fails with its output if it
    fails. A test process that has used libgomp cannot be forked safely
    afterwards, so every framework runs in a process of its own.
    """
    path = _procs.write_script(tmp_path, script)
    env = _procs.script_env()
    env["OPENBLAS_NUM_THREADS"] = "2"
    result = subprocess.run(
        [sys.executable, str(path), setup],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [x.split(" ", 1) for x in result.stdout.splitlines() if " " in x]
    return {key: value for key, value in lines}


def require(setup: str) -> None:
    """Skips unless what `setup` drives is installed."""
    import ctypes.util
    import importlib.util

    if setup in ("torch", "sklearn") and importlib.util.find_spec(setup) is None:
        pytest.skip(f"{setup} is not installed")
    if setup == "gomp" and ctypes.util.find_library("gomp") is None:
        pytest.skip("libgomp is not installed")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("setup", ["torch", "sklearn", "gomp"])
def test_default_does_not_fork_after_a_gnu_openmp_pool_started(tmp_path, setup):
    """Kind B (issue 14.3): once GNU OpenMP's pool runs in the training
    process (torch's intra-op pool, scikit-learn's compiled code, libgomp
    called directly), a forked worker whose loader enters a parallel region
    waits forever for the pool's threads. The default must not fork, and a
    read must return the right batch."""
    require(setup)
    out = run_setup(tmp_path, FORK_SAFETY_SCRIPT, setup)
    assert out["METHOD"] == "subprocess", out
    assert out["BATCH"] == "[8, 10, 12, 14]", out


@pytest.mark.timeout(60)
def test_default_does_not_fork_beside_a_native_thread_of_unknown_origin(tmp_path):
    """Kind B: a thread started in C by a library nobody knows (no Python
    thread, no OpenBLAS) could hold anything at the fork: it counts as
    unsafe."""
    out = run_setup(tmp_path, FORK_SAFETY_SCRIPT, "native-thread")
    assert out["METHOD"] == "subprocess", out
    assert out["BATCH"] == "[8, 10, 12, 14]", out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("setup", ["numpy", "ended-python-thread"])
def test_default_still_forks_beside_openblas_and_an_ended_python_thread(
    tmp_path, setup
):
    """Kind B, the other side: NumPy's OpenBLAS pool is fork-safe (it stops
    its threads before a fork), and a Python thread that has ended holds
    nothing; neither may turn forking off."""
    out = run_setup(tmp_path, FORK_SAFETY_SCRIPT, setup)
    assert int(out["THREADS"]) >= 2, out  # OpenBLAS's thread runs: a real case
    assert out["METHOD"] == "fork", out
    assert out["BATCH"] == "[8, 10, 12, 14]", out


FORK_WARNING_SCRIPT = """
import sys, warnings
import numpy as np
import _launch_loaders as L

L.gomp_parallel()  # GNU OpenMP's pool now runs here
from keras_oom import PrefetchLoaderDataset

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with PrefetchLoaderDataset(L.numpy_loader, np.arange(8), batch_size=2,
                               num_workers=2, start_method="fork",
                               timeout=20) as ds:
        print("BATCH", ds[1].tolist(), flush=True)
        print("PIDS", *ds.worker_pids, flush=True)
for w in caught:
    if issubclass(w.category, RuntimeWarning):
        print("WARNING", str(w.message).replace("\\n", " "), flush=True)
"""


@pytest.mark.timeout(60)
def test_explicit_fork_still_forks_and_warns_once_naming_the_pool(tmp_path):
    """Kind B: `start_method="fork"` is the user's call: it forks, but warns
    once per dataset, naming the risk and what was found."""
    require("gomp")
    path = _procs.write_script(tmp_path, FORK_WARNING_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=50,
        env=_procs.script_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "BATCH [4, 6]" in lines, result.stdout
    warned = [x for x in lines if x.startswith("WARNING")]
    assert len(warned) == 1, result.stdout  # two workers forked, one warning
    for word in ("fork", "deadlock", "GNU OpenMP", "libgomp", "subprocess"):
        assert word in warned[0], warned[0]


THREAD_HAZARD = """
import threading
from keras_oom import launch
from keras_oom.forksafe import fork_hazards

def threads():
    return [h for h in fork_hazards() if "Python thread" in h]

print("BEFORE", threads(), flush=True)
release = threading.Event()
thread = threading.Thread(target=release.wait, name="held-lock-thread")
thread.start()
print("RUNNING", threads(), launch.default_start_method(), flush=True)
release.set()
thread.join(10)
print("ENDED", threads(), flush=True)
"""


@pytest.mark.timeout(60)
def test_fork_hazards_count_a_running_python_thread_and_forget_an_ended_one(
    tmp_path,
):
    """Kind B: a Python thread that runs may hold a lock the child needs; once
    it has ended (and the kernel has let its task go), it counts no more.

    In a fresh interpreter: threads that earlier tests left in this one (a
    dataset's sample threads until it is collected, a backend's pools)
    would count too."""
    result = _procs.run_script(tmp_path, THREAD_HAZARD)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {
        line.split(" ", 1)[0]: line.split(" ", 1)[1]
        for line in result.stdout.splitlines()
        if line.startswith(("BEFORE", "RUNNING", "ENDED"))
    }
    assert lines["BEFORE"] == "[]", result.stdout
    running = lines["RUNNING"]
    assert "1 other Python thread runs ('held-lock-thread')" in running, running
    assert running.endswith(" subprocess"), running
    assert lines["ENDED"] == "[]", result.stdout


# -- start methods and the loader's pickling ---------------------------------------


def test_after_jax_ran_the_default_does_not_fork_and_fit_works(tmp_path):
    code = """
import warnings
warnings.simplefilter("default")
import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras_oom import PrefetchLoaderDataset
from keras_oom.launch import default_start_method

jnp.ones((8, 8)).sum().block_until_ready()  # the JAX backend now runs
print("METHOD", default_start_method(), flush=True)

ds = PrefetchLoaderDataset(
    lambda ids: np.stack([ids, ids * 2], axis=1).astype("float32"),
    np.arange(32), labels=np.arange(32).astype("float32"), batch_size=8,
    num_workers=2,
)
with ds:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    history = model.fit(ds, epochs=2, shuffle=False, verbose=0)
    print("LOSSES", len(history.history["loss"]), flush=True)
    print("PIDS", *ds.worker_pids, flush=True)
"""
    result = _procs.run_script(tmp_path, code, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "os.fork() was called" not in result.stderr
    assert "METHOD subprocess" in result.stdout
    assert "LOSSES 2" in result.stdout
    pids_line = [x for x in result.stdout.splitlines() if x.startswith("PIDS")][0]
    assert _procs.wait_gone(_procs.parse_pids(pids_line)) == []


def test_unguarded_script_is_not_rerun_by_workers(tmp_path):
    code = """
print("MAIN-MODULE-RAN", flush=True)
import jax.numpy as jnp
import numpy as np
from keras_oom import PrefetchLoaderDataset

jnp.arange(4).sum().block_until_ready()
ds = PrefetchLoaderDataset(lambda ids: ids * 2, np.arange(16), batch_size=4,
                           num_workers=2, start_method=None)
print("BATCHES", [ds[i].tolist() for i in range(len(ds))], flush=True)
ds.close()
"""
    result = _procs.run_script(tmp_path, code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("MAIN-MODULE-RAN") == 1
    assert "BATCHES [[0, 2, 4, 6], [8, 10, 12, 14]" in result.stdout


@pytest.mark.timeout(90)
# An explicit fork after other tests ran JAX here: JAX warns, as it should.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.parametrize("start_method", ["fork", "subprocess", "spawn", "forkserver"])
def test_every_start_method_gives_correct_batches(start_method):
    ids = np.arange(30)
    ref = LoaderDataset(_procs.ids_loader, ids, batch_size=4, shuffle=True, seed=2)
    with PrefetchLoaderDataset(
        _procs.ids_loader,
        ids,
        batch_size=4,
        shuffle=True,
        seed=2,
        num_workers=2,
        start_method=start_method,
    ) as ds:
        for _ in range(2):
            for i in range(len(ds)):
                got, want = ds[i], ref[i]
                np.testing.assert_array_equal(got["x"], want["x"])
                np.testing.assert_array_equal(got["n"], want["n"])
            ds.on_epoch_end()
            ref.on_epoch_end()
        pids = ds.worker_pids
        assert len(pids) == 2
        assert os.getpid() not in pids
    assert _procs.wait_gone(pids) == []


def test_lambda_loader_with_subprocess_start_method():
    offset = 5
    with PrefetchLoaderDataset(
        lambda ids: ids + offset, IDS, batch_size=4, start_method="subprocess"
    ) as ds:
        np.testing.assert_array_equal(ds[1], IDS[4:8] + 5)


def test_unpicklable_loader_is_a_type_error_for_subprocess():
    lock = threading.Lock()

    def loader(ids):
        with lock:
            return ids

    before = _procs.worker_descendants()
    with pytest.raises(TypeError, match="cloudpickle"):
        PrefetchLoaderDataset(loader, IDS, batch_size=4, start_method="subprocess")
    assert _procs.worker_descendants() - before == set()

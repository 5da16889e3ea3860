"""A worker ends when its parent dies, however many files the parent has open.

`worker._exit_with_parent` starts a thread that waits on a pidfd of the
parent. Here a stand-in parent (a script) forks a stand-in worker that first
fills every descriptor number below 1024, so that the pidfd gets a number
above 1024, where `select.select()` refuses to work; then the test SIGKILLs
the parent and expects the worker gone.
"""

from __future__ import annotations

import os
import resource

import _procs
import pytest

SCRIPT = """
import os
import resource
import sys
import time

from keras_oom import worker

parent = os.getpid()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
report_r, report_w = os.pipe()
child = os.fork()
if child == 0:
    os.close(report_r)
    # Fill every free descriptor number below 1024 (as a process with many
    # open files would), so that the next descriptor is 1024 or above.
    fillers = []
    while True:
        fd = os.open(os.devnull, os.O_RDONLY)
        fillers.append(fd)
        if fd >= 1023:
            break
    worker._exit_with_parent(parent)
    pidfds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                pidfds.append(int(fd))
        except OSError:  # the descriptor listdir itself used
            pass
    os.write(report_w, f"{max(pidfds, default=-1)}\\n".encode())
    time.sleep(60)
    os._exit(0)
os.close(report_w)
with os.fdopen(report_r) as report:
    pidfd = report.readline().strip()
print("PIDS", child, flush=True)
print("PIDFD", pidfd, flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(20)
def test_worker_ends_with_its_parent_when_the_pidfd_is_above_1024(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} allows no descriptor >= 1024")
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no os.pidfd_open: the watch polls the pid instead")
    proc = _procs.popen_script(tmp_path, SCRIPT)
    pids: list[int] = []
    try:
        pids = _procs.parse_pids(proc.stdout.readline())
        pidfd_line = proc.stdout.readline().split()
        assert pidfd_line[0] == "PIDFD" and len(pidfd_line) == 2, pidfd_line
        # The case under test: the watch waits on a descriptor >= 1024.
        assert int(pidfd_line[1]) >= 1024, pidfd_line
        assert all(_procs.alive(p) for p in pids)
        proc.kill()
        proc.wait(10)
        left = _procs.wait_gone(pids, 5.0)
        assert left == [], {p: _procs.state(p) for p in left}
    finally:
        proc.kill()
        proc.wait(10)
        for p in pids:  # a surviving worker holds the script's stderr open
            _procs.kill(p)
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert "Traceback" not in stderr, stderr


OWNER_SCRIPT = """
import functools, sys, time
import numpy as np
import _launch_loaders as L
from keras_oom import PrefetchLoaderDataset

ds = PrefetchLoaderDataset(functools.partial(L.sleeper_loader, path=sys.argv[2]),
                           np.arange(8), batch_size=2, num_workers=2,
                           start_method=sys.argv[1])
assert ds[0].tolist() == [0, 1]
assert ds[1].tolist() == [4, 9]
print("PIDS", *ds.worker_pids, flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_sigkill_of_the_parent_ends_the_loaders_own_processes(tmp_path, start_method):
    """Kind D (issue 14.10): each worker's loader started a child that
    would sleep for minutes; the training process is SIGKILLed. Each worker
    notices and ends its whole process group: itself and the processes its
    loader started."""
    import subprocess
    import sys

    import _launch_loaders

    log = tmp_path / "pool-pids"
    path = _procs.write_script(tmp_path, OWNER_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(path), start_method, str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_procs.script_env(),
        cwd=tmp_path,
    )
    workers: list[int] = []
    children: list[int] = []
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), line + proc.stderr.read()
        workers = _procs.parse_pids(line)
        children = _launch_loaders.read_pids(log)
        assert len(children) >= 2, children
        proc.kill()
        proc.wait(10)
        left = _procs.wait_gone(workers + children, 5.0)
        assert left == [], {p: _procs.cmdline(p)[:80] for p in left}
    finally:
        proc.kill()
        proc.wait(10)
        for p in workers + children:
            _procs.kill(p)
        proc.stdout.close()
        proc.stderr.close()

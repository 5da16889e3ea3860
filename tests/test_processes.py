"""The worker handle (`keras_oom.processes.Process`) and the exit it reports."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from keras_oom import processes


class _ForkServerChild:
    """A `multiprocessing.Process` started by the fork server, as the handle
    sees it: the server reaps the worker and reports its status on a pipe,
    some time after the worker has exited (it must first get SIGCHLD)."""

    def __init__(self, code: int) -> None:
        self._code = code
        self.reported = False
        self.joins: list[float | None] = []

    @property
    def exitcode(self) -> int | None:
        return self._code if self.reported else None

    def join(self, timeout: float | None = None) -> None:
        self.joins.append(timeout)
        self.reported = True  # the server's report arrives while we wait

    def close(self) -> None:
        pass


@pytest.mark.timeout(30)
@pytest.mark.skipif(not processes.pidfds_work(), reason="needs pidfds (Linux 5.3+)")
def test_a_fork_server_child_reported_late_keeps_its_own_exit_code():
    """Kind start-error: a "forkserver" worker that exited (its pidfd is
    readable) before the fork server reported its status read as code 255,
    "status taken by someone else", so a worker re-running an unguarded
    script (code 87) was not recognised, and the pool retried it three
    times instead of naming the missing main guard (seen under load in CI).
    The handle now waits for the server's report."""
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(87)"])
    try:
        # Exited, not reaped: the pid stays this child's while the test runs.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        late = _ForkServerChild(87)
        handle = processes.Process(
            child.pid, process=late, sentinel=None, own_child=False, pipe=None
        )
        try:
            assert handle.exitcode == 87
            assert late.joins, "the handle never waited for the server's report"
            assert all(t is not None and t > 0 for t in late.joins), late.joins
        finally:
            handle.forget()
    finally:
        child.wait()

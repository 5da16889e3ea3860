"""When an executor starts a worker index again, and when it gives up.

The executor contract (executor.py) says: a lost worker is restarted under
the same index, with a pause between failed starts (`RETRY_PAUSE`, doubled
each time); `MAX_START_FAILURES` failed starts of one index in a row, or a
failure that cannot change (the loader does not pickle, `worker_init`
raised), break the executor, and every later call raises. `Restarts` keeps
that bookkeeping for the local pool (process_pool.py), apart from the
processes, so that it reads, and tests, on its own; another executor may
use it too. No processes, no I/O.
"""

from __future__ import annotations

import time

from keras_oom.errors import WorkerStartError
from keras_oom.executor import MAX_START_FAILURES, RETRY_PAUSE
from keras_oom.protocol import describe_error


class Restarts:
    """Failed starts per worker index, the pause before the next, and what
    broke the executor.

    Args:
        num_workers: Worker indexes, `range(num_workers)`.
    """

    def __init__(self, num_workers: int = 0) -> None:
        self._retry_at = [0.0] * num_workers
        # Failed starts in a row, per index: one Ctrl-C that kills every
        # starting worker is one failure of each, not a broken executor.
        self._failures = [0] * num_workers
        self.broken: BaseException | None = None
        self._broken_raised = False

    def due(self, worker_index: int) -> bool:
        """Whether vacant index `worker_index` may be started now."""
        return time.monotonic() >= self._retry_at[worker_index]

    def seconds_until(self, worker_index: int) -> float:
        """Seconds until `worker_index` may be started (negative: overdue)."""
        return self._retry_at[worker_index] - time.monotonic()

    def started(self, worker_index: int) -> None:
        """Worker `worker_index` is serving: its failures are forgotten."""
        self._failures[worker_index] = 0

    def failed(self, worker_index: int, error: BaseException) -> None:
        """A start of `worker_index` failed with `error`: pause, or break."""
        self._failures[worker_index] += 1
        failures = self._failures[worker_index]
        if failures >= MAX_START_FAILURES:
            broken = WorkerStartError(
                f"keras_oom worker {worker_index} failed to start {failures} "
                f"times in a row; the last time: {describe_error(error)}"
            )
            broken.__cause__ = error
            self.break_(broken)
        else:
            pause = RETRY_PAUSE * 2 ** (failures - 1)
            self._retry_at[worker_index] = time.monotonic() + pause

    def break_(self, error: BaseException) -> None:
        """The executor cannot start workers: the first `error` is kept."""
        if self.broken is None:
            self.broken = error

    def raise_if_broken(self) -> None:
        """Raises what broke the executor: its own error once, then a
        `WorkerStartError` caused by it."""
        broken = self.broken
        if broken is None:
            return
        if not self._broken_raised and not isinstance(broken, WorkerStartError):
            self._broken_raised = True
            raise broken
        error = WorkerStartError(
            f"The dataset's worker pool is broken: {describe_error(broken)}"
        )
        raise error from broken

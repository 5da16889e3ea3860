"""Which load a lost Ray actor is charged with, and when a load runs alone.

Ray fails the ref of every load an actor had not answered when it dies,
including loads it had finished whose reply had not reached the driver.
So with `in_flight > 1` loads queued on an actor, the driver cannot tell
which one was running when it died: the head of the queue may be innocent,
and the load behind it the one whose loader killed the actor.

The rule, sound under that uncertainty:

- An actor lost (a crash, the OOM killer, its node removed) after its
  setup with several loads sent: each is a suspect, and is sent again. None
  is charged: any of them may have been running, or none yet.
- A suspect runs alone: `RayActors` sends it only to an actor with nothing
  queued, and sends nothing behind it until its result arrives.
- A load lost alone on its actor was certainly running: the first time it
  is `lost_once` (a suspect too) and sent again, as a crash or a lost node
  may be transient; the second time it ends with a `WorkerDiedError`
  ("lost a second time"). A loader that kills every actor so fails after
  at most three.
- A load that arrives is cleared.
- Loads on an actor lost before its setup ran never started: sent again,
  not suspects (failed starts are bounded by `Restarts`). So are loads held
  back and not yet sent, and those behind a load that timed out or an actor
  ended by `kill()` (the executor ended that actor, not their loader).
- `timeout` charges the head of the queue: unanswered for `timeout`
  seconds since the load ahead of it was answered, so the one running.
  `kill()` charges the head too, as the executor contract says (its caller
  ends the worker's running load); it may have finished unanswered, but
  the engine never calls `kill()`.
"""

from __future__ import annotations

from typing import Any

from keras_oom.errors import WorkerDiedError, WorkerTimeoutError
from keras_oom.protocol import Outcome
from keras_oom.ray_options import one_line


class Losses:
    """The keys lost once with their actor, and the error each loss ends in."""

    def __init__(self) -> None:
        self.suspects: set[Any] = set()  # lost with an actor: each runs alone
        self.lost_once: set[Any] = set()  # lost alone, so certainly theirs

    def alone(self, key: Any) -> bool:
        """Whether the load of `key` must run alone on its actor."""
        return key in self.suspects

    def arrived(self, key: Any) -> None:
        self.suspects.discard(key)
        self.lost_once.discard(key)

    def outcome(
        self,
        where: str,
        pid: int,
        key: Any,
        *,
        sent: bool,
        started: bool,
        alone: bool,
        charged: str | None,
        cause: BaseException | None,
        timeout: float | None = None,
    ) -> Outcome | None:
        """The error that ends the load of `key` on the lost actor `where`,
        or None: send it again.

        Args:
            sent: Whether the load was sent to the actor (not held back).
            started: Whether the actor had run its setup.
            alone: Whether it was the only load sent to the actor and not
                answered: the one running.
            charged: "timeout" or "killed" for the head of the queue of an
                actor the executor ended, "spared" for the loads behind it,
                None for an actor lost on its own.
            cause: What Ray said, if anything.
            timeout: The executor's `timeout`, named when it is charged.
        """
        if charged == "timeout":
            return Outcome(
                error=WorkerTimeoutError(
                    f"keras_oom's {where} took longer than timeout={timeout}s "
                    "on one batch and was killed (ray.kill)."
                ),
                pid=pid,
            )
        if not sent or not started or charged == "spared":
            return None
        if charged is None:
            self.suspects.add(key)  # a pure function: run it again, alone
            if not alone:
                return None  # perhaps not the one running: not charged
            if key not in self.lost_once:
                self.lost_once.add(key)
                return None
        again = "" if charged == "killed" else " a second time"
        why = "" if cause is None else f" Ray says: {one_line(cause)}"
        return Outcome(
            error=WorkerDiedError(
                f"keras_oom's {where} was lost{again} while loading a batch.{why}",
                pid=pid,
                exitcode=None,
                batch_index=None,
            ),
            pid=pid,
        )

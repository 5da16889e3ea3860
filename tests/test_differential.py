"""Issue 14's differential test: `PrefetchLoaderDataset` against `LoaderDataset`.

A Hypothesis state machine runs one random program on two datasets built
alike: a `LoaderDataset` (the reference, everything in this process) and a
`PrefetchLoaderDataset` (workers forked, or fresh interpreters). Both are
subclasses whose `load` adds their own `self.level` to the loader's batch,
so that changing state between epochs can be a step. The program reads
batches in any order, re-reads, holds batches and drops them, ends epochs,
sets epochs, changes `level` at an epoch boundary and kills workers. After
every step:

- every batch the prefetching dataset returns equals the reference's for
  the same step, leaf by leaf, shape and dtype included;
- every batch still held equals the copy taken when it was returned (an
  array must not change under the code that holds it);
- where the reference raises (a loader that fails for some ids), the
  prefetching dataset raises the same exception class.

At teardown both are closed and no process may be left.

Modelled exceptions to "equal": a read after a `SIGKILL` of a worker may
raise `WorkerDiedError` for the batch that worker held (at most once per
kill, naming the killed pid and the batch), and must then succeed when
read again; an exception that may not survive pickling may arrive as a
keras-oom `RuntimeError` that names its class; a batch whose ids do not
pickle may end with an error that names them (Kind C item 4) but must not
hang, and must not fail another batch's read.

A step that does not return within `STEP_LIMIT` seconds is a hang: a
watchdog closes the dataset from another thread (which wakes the reader
with `DatasetClosedError`) and the step fails, so Hypothesis can shrink it.

The fixed programs at the end run the same machine on one program per kind
of issue 14, without Hypothesis: cheap, deterministic, each named after the
failure it provokes. Two kinds live only there: torch's thread pool in the
parent (Kind B, in a fresh interpreter, since the pool would stay in this
one) and a low open-file limit (Kind D item 7). Not covered here, as both
classes share the code in question: Keras's `steps_per_epoch` (Kind E item
8) and loaders returning the wrong number of rows (Kind E item 11).

Loaders and the dataset subclasses live in `_differential_loaders.py`:
forked workers inherit it, fresh interpreters import it through the
parent's `sys.path`, where pytest put `tests/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import resource
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import _differential_loaders as dl
import _procs
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from keras_oom import (
    DatasetClosedError,
    PrefetchLoaderDataset,
    WorkerDiedError,
    WorkerStartError,
    WorkerTimeoutError,
)

# Seconds one step may take before it counts as a hang. A fresh interpreter
# importing Keras (a subclass's worker does) takes a few seconds on a busy
# machine; a forked worker starts at once.
STEP_LIMIT = {"fork": 10.0, "subprocess": 30.0, None: 30.0}
# Kills per program: the pool gives up on a slot after 3 failed starts in a
# row, and a kill during a worker's start-up counts as one.
MAX_KILLS = 2
# Errors of the pool itself: never an acceptable stand-in for the loader's.
POOL_ERRORS = (
    WorkerDiedError,
    WorkerTimeoutError,
    WorkerStartError,
    DatasetClosedError,
)


@dataclasses.dataclass(frozen=True)
class Config:
    """One example's datasets: what both are built with."""

    start_method: str | None = "fork"
    kind: str = "plain"  # one of dl.KINDS, or "torch"
    width: int = dl.WIDE
    rng: bool = False
    n: int = 8
    batch_size: int = 2
    shuffle: bool = False
    seed: int = 0
    drop_remainder: bool = False
    num_workers: int = 1
    labels: bool = False
    weights: bool = False
    raises: tuple[tuple[int, str], ...] = ()  # (sample id, dl.ERRORS name)
    opaque: tuple[int, ...] = ()  # sample ids that do not pickle
    capture: bool = False  # the loader reads an array from another dataset
    spawn: bool = False  # the loader starts a process of its own


# The hostile options: a loader raising for some ids, ids that do not pickle,
# an array captured from another dataset, a loader starting a process.
FAULTS = frozenset({"raises", "opaque", "capture", "spawn"})


@st.composite
def configs(
    draw: Any,
    start_methods: tuple[str, ...] = ("fork", "subprocess"),
    kinds: tuple[str, ...] = dl.KINDS,
    faults: frozenset[str] = FAULTS,
) -> Config:
    """Small datasets of every loader kind, with the hostile options `faults`."""
    start_method = draw(st.sampled_from(start_methods))
    kind = draw(st.sampled_from(kinds))
    batch_size = draw(st.integers(1, 4))
    drop_remainder = draw(st.booleans())
    n = draw(st.integers(batch_size if drop_remainder else 1, 12))
    width = draw(st.sampled_from([dl.WIDE, dl.NARROW])) if kind == "plain" else dl.WIDE
    labels = draw(st.booleans())
    raises: dict[int, str] = {}
    opaque: list[int] = []
    capture = spawn = False
    if "raises" in faults:
        raises = draw(
            st.dictionaries(
                st.integers(0, n - 1), st.sampled_from(sorted(dl.ERRORS)), max_size=2
            )
        )
    if "opaque" in faults:
        opaque = draw(st.lists(st.integers(0, n - 1), max_size=1))
    if "capture" in faults:
        capture = draw(st.booleans())
    if "spawn" in faults:  # a fork per batch: rarely
        spawn = draw(st.sampled_from([False, False, False, True]))
    return Config(
        start_method=start_method,
        kind=kind,
        width=width,
        rng=draw(st.booleans()),
        n=n,
        batch_size=batch_size,
        shuffle=draw(st.booleans()),
        seed=draw(st.integers(0, 3)),
        drop_remainder=drop_remainder,
        num_workers=draw(st.integers(1, 2)),
        labels=labels,
        weights=labels and draw(st.booleans()),
        raises=tuple(sorted(raises.items())),
        opaque=tuple(opaque),
        capture=capture,
        spawn=spawn,
    )


# -- outcomes and comparisons ----------------------------------------------------


@dataclasses.dataclass
class Returned:
    value: Any


@dataclasses.dataclass
class Raised:
    error: BaseException


class Hang(AssertionError):
    """A step that did not return within its limit."""


def snapshot(x: Any) -> Any:
    """A deep copy of a batch's containers and arrays."""
    if isinstance(x, dict):
        return {k: snapshot(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(snapshot(v) for v in x)
    return np.array(x, copy=True)


def assert_same(got: Any, want: Any, what: str) -> None:
    """Same structure, and every leaf equal in shape, dtype and values."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{what}: a {type(got).__name__}, not a dict"
        assert list(got) == list(want), f"{what}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{what}[{k!r}]")
        return
    if isinstance(want, (tuple, list)):
        assert type(got) is type(want), f"{what}: {type(got)} != {type(want)}"
        assert len(got) == len(want), f"{what}: {len(got)} items != {len(want)}"
        for k, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{what}[{k}]")
        return
    assert isinstance(got, np.ndarray), f"{what}: a {type(got).__name__}"
    np.testing.assert_array_equal(got, want, err_msg=what, strict=True)


def describe(e: BaseException) -> str:
    """The exception's class, message, notes and cause, for messages."""
    try:
        text = str(e)
    except Exception:
        text = "<str() failed>"
    notes = getattr(e, "__notes__", ())
    try:
        notes = " | ".join(str(n) for n in notes)
    except TypeError:
        notes = repr(notes)
    cause = e.__cause__
    tail = "" if cause is None else f" (cause: {type(cause).__name__}: {cause})"
    return f"{type(e).__module__}.{type(e).__qualname__}: {text} [{notes}]{tail}"


# -- the machine ----------------------------------------------------------------


class DifferentialMachine(RuleBasedStateMachine):
    """The same program on a `LoaderDataset` and a `PrefetchLoaderDataset`.

    Subclasses made by `machine()` add the `initialize` rule that draws the
    `Config`; the fixed programs call `build` and the rules directly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.before = _procs.worker_descendants()
        self.cfg = Config()
        self.ref: Any = None
        self.pf: Any = None
        self.source: Any = None  # Kind A item 2's dataset A
        self.held: list[tuple[str, Any, Any]] = []  # (what, batch, its copy)
        self.kills = 0
        self.killed: set[int] = set()  # pids sent SIGKILL
        self.reported: set[int] = set()  # of those, named by a WorkerDiedError
        self.last: int | None = None

    # -- building ---------------------------------------------------------------

    def build(self, cfg: Config) -> None:
        self.cfg = cfg
        ids: Any = np.arange(cfg.n)
        if cfg.opaque:
            ids = np.empty(cfg.n, dtype=object)
            ids[:] = [dl.OpaqueId(i) if i in cfg.opaque else i for i in range(cfg.n)]
        labels = np.arange(cfg.n, dtype=np.int64) * 3 if cfg.labels else None
        weights = (
            np.linspace(0.5, 1.5, cfg.n, dtype=np.float32) if cfg.weights else None
        )
        extra = self._captured() if cfg.capture else None
        common: dict[str, Any] = dict(
            sample_weights=weights,
            batch_size=cfg.batch_size,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            drop_remainder=cfg.drop_remainder,
            extra=extra,
        )

        def loader() -> dl.Batches:
            raises = dict(cfg.raises)
            return dl.Batches(cfg.kind, cfg.width, raises, rng=cfg.rng, spawn=cfg.spawn)

        ref_cls = dl.LevelRngDataset if cfg.rng else dl.LevelDataset
        pf_cls = dl.PrefetchLevelRngDataset if cfg.rng else dl.PrefetchLevelDataset
        self.ref = ref_cls(loader(), ids, labels, **common)
        self.pf = pf_cls(
            loader(),
            ids,
            labels,
            num_workers=min(cfg.num_workers, len(self.ref)),
            start_method=cfg.start_method,
            **common,
        )

    def _captured(self) -> np.ndarray:
        """Row 0 of dataset A's batch 0, a zero-copy array; A is then closed.

        Kind A item 2: a forked worker of the datasets under test must see
        its values, not the zero pages that replace inherited mappings.
        """
        self.source = PrefetchLoaderDataset(
            dl.capture_loader, np.arange(2), batch_size=1, num_workers=1,
            start_method="fork",
        )  # fmt: skip
        a0 = self._bounded(lambda: self.source[0], "dataset A's ds[0]", self.source)
        self.source.close()
        self.held.append(("the array captured from dataset A", a0, snapshot(a0)))
        return a0

    # -- running a step within bounds -------------------------------------------

    def _bounded(self, fn: Callable[[], Any], what: str, ds: Any = None) -> Any:
        """`fn()`, or `Hang` if it takes longer than the step limit.

        At the limit a timer thread closes the dataset, which wakes a
        reader blocked in it with `DatasetClosedError`.
        """
        ds = self.pf if ds is None else ds
        limit = STEP_LIMIT[self.cfg.start_method]
        fired = threading.Event()

        def give_up() -> None:
            fired.set()
            ds.close()

        timer = threading.Timer(limit, give_up)
        timer.daemon = True
        timer.start()
        try:
            result = fn()
        except BaseException as e:
            timer.cancel()
            timer.join()
            if fired.is_set():
                raise Hang(f"{what} did not return within {limit:.0f} s") from e
            raise
        timer.cancel()
        timer.join()
        if fired.is_set():
            raise Hang(f"{what} did not return within {limit:.0f} s")
        return result

    def _reference(self, index: int) -> Returned | Raised:
        try:
            return Returned(snapshot(self.ref[index]))
        except (Exception, dl.LoaderAbort) as e:
            return Raised(e)

    def _prefetch(self, index: int) -> Returned | Raised:
        try:
            return Returned(self._bounded(lambda: self.pf[index], f"ds[{index}]"))
        except Hang:
            raise
        except (Exception, dl.LoaderAbort) as e:
            return Raised(e)

    # -- rules --------------------------------------------------------------------

    @rule(batch=st.integers(0, 11), negative=st.booleans(), hold=st.booleans())
    def read(self, batch: int, negative: bool, hold: bool) -> None:
        """Reads a batch (any order; negative indices count from the end)."""
        per_epoch = len(self.ref)
        self.compare(batch % per_epoch - (per_epoch if negative else 0), hold)

    @precondition(lambda self: self.last is not None)
    @rule(hold=st.booleans())
    def reread(self, hold: bool) -> None:
        """Reads the last index read again (batches 0 and 1 are cached)."""
        assert self.last is not None
        self.compare(self.last, hold)

    @rule(past_end=st.booleans())
    def read_out_of_range(self, past_end: bool) -> None:
        index = len(self.ref) if past_end else -len(self.ref) - 1
        want, got = self._reference(index), self._prefetch(index)
        for name, outcome in (("LoaderDataset", want), ("prefetch", got)):
            assert isinstance(outcome, Raised), f"{name}[{index}] returned a batch"
            assert type(outcome.error) is IndexError, describe(outcome.error)

    @precondition(lambda self: bool(self.held))
    @rule(which=st.integers(0, 40), collect=st.booleans())
    def drop(self, which: int, collect: bool) -> None:
        """Lets go of a held batch (its memory may now be reused).

        Batches hold no reference cycles, so dropping frees them; the
        collection is of the young generations only, since a full one
        costs about 0.3 s with JAX loaded.
        """
        del self.held[which % len(self.held)]
        if collect:
            gc.collect(1)

    @rule()
    def epoch_end(self) -> None:
        self.ref.on_epoch_end()
        self._bounded(self.pf.on_epoch_end, "on_epoch_end()")

    @rule(epoch=st.integers(0, 3))
    def set_epoch(self, epoch: int) -> None:
        self.ref.set_epoch(epoch)
        self._bounded(lambda: self.pf.set_epoch(epoch), f"set_epoch({epoch})")

    @rule(
        when=st.sampled_from(["before_epoch_end", "after_epoch_end", "before_set_epoch",
                              "after_set_epoch"]),
        epoch=st.integers(0, 3),
    )  # fmt: skip
    def change_level(self, when: str, epoch: int) -> None:
        """A curriculum: `level += 1` on both, right at an epoch boundary.

        Kind E item 9: the next epoch's batches must be loaded with the new
        level, also those prefetched across the boundary before it changed.
        """
        if when.startswith("after"):
            self._boundary(when, epoch)
        self.ref.level += 1
        self.pf.level += 1
        if when.startswith("before"):
            self._boundary(when, epoch)

    def _boundary(self, when: str, epoch: int) -> None:
        if when.endswith("epoch_end"):
            self.epoch_end()
        else:
            self.set_epoch(epoch)

    @precondition(lambda self: self.kills < MAX_KILLS)
    @rule(worker=st.integers(0, 1))
    def kill_worker(self, worker: int) -> None:
        """SIGKILL to one worker, as the OOM killer sends."""
        pids = self._bounded(lambda: self.pf.worker_pids, "worker_pids")
        if not pids:  # every slot is waiting to restart a worker
            return
        pid = pids[worker % len(pids)]
        _procs.kill(pid)
        self.killed.add(pid)
        self.kills += 1

    @invariant()
    def held_batches_keep_their_values(self) -> None:
        for what, batch, copy in self.held:
            assert_same(batch, copy, f"{what}, held since it was returned,")

    def teardown(self) -> None:
        self.held.clear()
        for ds in (self.pf, self.source):
            if ds is not None:
                ds.close()
        self.pf = self.ref = self.source = None
        # Closed pools wait for their workers: a process still here is one
        # that nothing will end.
        _procs.assert_no_new_workers(self.before, grace=1.0)

    # -- one read on both -----------------------------------------------------

    def compare(self, index: int, hold: bool) -> None:
        """Reads `index` on both; checks the outcomes agree; maybe holds it."""
        self.last = index
        ids = self.ref.batch_ids(index)
        what = f"ds[{index}] (epoch {self.ref.epoch}, ids {ids.tolist()})"
        want = self._reference(index)
        got = self._prefetch(index)
        while (
            isinstance(got, Raised)
            and isinstance(got.error, WorkerDiedError)
            and got.error.pid in self.killed
        ):
            # The batch a killed worker held: once per kill, then it loads
            # (or, if it went to another killed worker, fails once more).
            assert got.error.pid not in self.reported, describe(got.error)
            self.reported.add(got.error.pid)
            assert got.error.batch_index == index % len(self.ref), describe(got.error)
            got = self._prefetch(index)
        if isinstance(want, Returned):
            self._expect_value(what, want, got, ids)
        else:
            self._expect_error(what, want, got, ids)
        assert self.pf.epoch == self.ref.epoch
        if hold and isinstance(got, Returned):
            self.held.append((what, got.value, snapshot(got.value)))

    def _expect_value(
        self, what: str, want: Returned, got: Returned | Raised, ids: Any
    ) -> None:
        if isinstance(got, Returned):
            assert_same(got.value, want.value, what)
            return
        opaque = [i for i in ids if isinstance(i, dl.OpaqueId)]
        if opaque and not isinstance(got.error, POOL_ERRORS):
            # Kind C item 4: ids that do not pickle may end the read, with
            # an error that says so.
            assert "OpaqueId" in describe(got.error), describe(got.error)
            return
        raise AssertionError(
            f"{what}: LoaderDataset returned a batch, PrefetchLoaderDataset "
            f"raised {describe(got.error)}"
        )

    def _expect_error(
        self, what: str, want: Raised, got: Returned | Raised, ids: Any
    ) -> None:
        raises = dict(self.cfg.raises)
        names = {raises[int(i)] for i in ids if int(i) in raises}
        problems = []
        # The reference raises the loader's own exception (with a note), not
        # an error about the note (Kind C item 5).
        if not any(type(want.error) is dl.ERRORS[name] for name in names):
            problems.append(f"LoaderDataset raised {describe(want.error)}")
        opaque = any(isinstance(i, dl.OpaqueId) for i in ids)
        if isinstance(got, Returned):
            problems.append("PrefetchLoaderDataset returned a batch")
        elif opaque and "OpaqueId" in describe(got.error):
            pass  # ids that cannot reach a worker fail first (Kind C item 4)
        elif not self._is_loader_error(got.error, names):
            problems.append(f"PrefetchLoaderDataset raised {describe(got.error)}")
        assert not problems, (
            f"{what}: the loader raised one of {sorted(names)}; " + "; ".join(problems)
        )

    @staticmethod
    def _is_loader_error(error: BaseException, names: set[str]) -> bool:
        """Whether `error` is the loader's exception (one of `names`), or, for
        one that may not travel, a keras-oom error that names it."""
        if any(type(error) is dl.ERRORS[name] for name in names):
            return True
        # A worker may end for a BaseException: WorkerDiedError will do if
        # it names the exception; a pool that gave up or closed will not.
        return (
            isinstance(error, RuntimeError)
            and not isinstance(error, (WorkerStartError, DatasetClosedError))
            and any(name in describe(error) for name in names & dl.MAY_NOT_TRAVEL)
        )


def machine(config_strategy: Any, name: str) -> type[DifferentialMachine]:
    """A `DifferentialMachine` whose examples draw from `config_strategy`."""

    class Drawn(DifferentialMachine):
        @initialize(cfg=config_strategy)
        def build_datasets(self, cfg: Config) -> None:
            self.build(cfg)

    Drawn.__name__ = Drawn.__qualname__ = name
    return Drawn


ForkDifferential = machine(configs(start_methods=("fork",)), "ForkDifferential")
SubprocessDifferential = machine(
    configs(start_methods=("subprocess",)), "SubprocessDifferential"
)

# On correct code the two tests take about 15 s (fork) and 20 s (fresh
# interpreters, whose workers import Keras) on 2 busy cores. On a failure
# Hypothesis shrinks the program for up to 5 minutes (its own limit), hence
# the timeouts; a hang costs a step limit per shrinking attempt. A failure
# that depends on timing (a batch overwritten while the caller reads it, a
# worker killed mid-send) may be reported as Flaky: still a failure, and
# the fixed programs below reproduce the deterministic ones.
_SETTINGS: dict[str, Any] = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    report_multiple_bugs=False,
)


@pytest.mark.timeout(480)
def test_fork_workers_give_the_reference_batches_under_any_program():
    """Kinds A, C, D, E: random programs on forked workers, every loader kind.

    Every returned and every held batch equals `LoaderDataset`'s, exceptions
    match, no step hangs and no process outlives `close()`.
    """
    run_state_machine_as_test(
        ForkDifferential,
        settings=settings(max_examples=60, stateful_step_count=30, **_SETTINGS),
    )


@pytest.mark.timeout(480)
def test_subprocess_workers_give_the_reference_batches_under_any_program():
    """Kinds A, C, D, E: random programs on fresh-interpreter workers.

    As the fork test; few examples, since each starts interpreters that
    import Keras (about 2 s each on a busy machine).
    """
    run_state_machine_as_test(
        SubprocessDifferential,
        settings=settings(max_examples=5, stateful_step_count=20, **_SETTINGS),
    )


# -- fixed programs: one per kind, the same machine without Hypothesis ----------


class Steps:
    """Runs the machine's rules by name, checking the invariant after each."""

    def __init__(self, m: DifferentialMachine) -> None:
        self.m = m

    def __getattr__(self, name: str) -> Callable[..., None]:
        step = getattr(self.m, name)

        def run(*args: Any, **kwargs: Any) -> None:
            step(*args, **kwargs)
            self.m.held_batches_keep_their_values()

        return run


@contextlib.contextmanager
def program(cfg: Config):
    """The machine built with `cfg`; torn down (and checked) at the end."""
    m = DifferentialMachine()
    try:
        m.build(cfg)
        yield Steps(m)
    except BaseException as e:
        try:
            m.teardown()
        except Exception as t:
            e.add_note(f"teardown failed too: {t}")
        raise
    m.teardown()


@pytest.mark.timeout(60)
def test_kept_batch_array_does_not_change_a_held_batch():
    """Kind A item 1: a loader refilling one kept `batch_array` for every batch.

    Batch 0, held, must not turn into batch 1 once batch 1 is loaded.
    """
    cfg = Config(kind="kept_batch_array", n=8, batch_size=2)
    with program(cfg) as p:
        p.read(0, negative=False, hold=True)
        p.read(1, negative=False, hold=True)
        p.read(2, negative=False, hold=False)


@pytest.mark.timeout(60)
def test_forked_worker_reads_an_array_captured_from_a_closed_dataset():
    """Kind A item 2: a zero-copy array of dataset A in dataset B's `load`.

    B's forked workers must see its values, not zeros; A is closed first,
    and the array, held, must keep its values too.
    """
    with program(Config(kind="plain", capture=True, n=4, batch_size=2)) as p:
        p.read(0, negative=False, hold=True)
        p.read(1, negative=False, hold=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", ["FrozenError", "TupleNotesError", "LoaderAbort"])
@pytest.mark.parametrize("kind", ["plain", "stack_samples_2"])
def test_loader_exception_of_any_class_ends_one_read(kind, error):
    """Kind C item 5 and Kind D item 6: exceptions that refuse notes, or are
    not `Exception`s.

    Both datasets raise the loader's own exception (or, for one that cannot
    travel, an error naming it) for the batch holding sample 2, the next
    batches load, and no worker outlives `close()`.
    """
    cfg = Config(kind=kind, n=8, batch_size=2, num_workers=2, raises=((2, error),))
    with program(cfg) as p:
        p.read(0, negative=False, hold=False)
        p.read(1, negative=False, hold=False)
        p.read(2, negative=False, hold=True)
        p.reread(hold=False)


@pytest.mark.timeout(60)
def test_ids_that_do_not_pickle_end_their_read_and_no_other():
    """Kind C item 4: sample id 2 works in `LoaderDataset` but does not pickle.

    Reading batch 0 must not fail for it (the workers load batch 1, ids 2
    and 3, ahead); reading batch 1 may raise an error naming it, reading it
    again must not hang, and batch 2 loads.
    """
    with program(Config(kind="plain", n=8, batch_size=2, opaque=(2,))) as p:
        p.read(0, negative=False, hold=False)
        p.read(1, negative=False, hold=False)
        p.reread(hold=False)
        p.read(2, negative=False, hold=False)


@pytest.mark.timeout(60)
def test_reading_again_a_batch_whose_ids_do_not_pickle_does_not_hang():
    """Kind C item 4: batch 0 holds sample id 0, which does not pickle.

    The first read may raise an error naming it; the second must not hang
    (it did: the batch was marked as sent before sending it failed), and
    the next batch loads.
    """
    with program(Config(kind="plain", n=8, batch_size=2, opaque=(0,))) as p:
        p.read(0, negative=False, hold=False)
        p.reread(hold=False)
        p.read(1, negative=False, hold=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "start_method, when",
    [
        ("fork", "before_epoch_end"),
        ("fork", "after_epoch_end"),
        ("fork", "before_set_epoch"),
        ("fork", "after_set_epoch"),
        ("subprocess", "before_epoch_end"),
    ],
)
def test_level_changed_at_an_epoch_boundary_reaches_the_workers(start_method, when):
    """Kind E item 9: a subclass's state changed between epochs.

    With both workers busy loading ahead across the boundary, the next
    epoch's batches must be loaded with the new `level`, as in
    `LoaderDataset`.
    """
    cfg = Config(start_method=start_method, n=4, batch_size=2, num_workers=2)
    with program(cfg) as p:
        p.read(0, negative=False, hold=True)
        p.read(1, negative=False, hold=True)
        p.change_level(when=when, epoch=1)
        p.read(0, negative=False, hold=True)
        p.read(1, negative=False, hold=True)


@pytest.mark.timeout(60)
def test_loader_starting_a_process_of_its_own_works_in_workers():
    """Kind E item 10: a loader that starts (and joins) a child process.

    Forked workers are daemonic, which `multiprocessing` forbids children;
    the batches must still equal `LoaderDataset`'s.
    """
    with program(Config(kind="batch_array", n=4, batch_size=2, spawn=True)) as p:
        p.read(0, negative=False, hold=False)
        p.read(1, negative=False, hold=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["batch_array", "stack_samples_2"])
def test_killed_workers_cost_one_read_and_held_batches_survive(kind):
    """Workers killed by SIGKILL (the OOM killer): at most one read per kill
    raises `WorkerDiedError`, every other read and every held batch equals
    `LoaderDataset`'s."""
    cfg = Config(kind=kind, n=12, batch_size=2, num_workers=2, shuffle=True)
    with program(cfg) as p:
        p.read(0, negative=False, hold=True)
        p.kill_worker(worker=0)
        for batch in range(1, 4):
            p.read(batch, negative=False, hold=True)
        p.kill_worker(worker=1)
        p.epoch_end()
        for batch in range(6):
            p.read(batch, negative=False, hold=True)


@pytest.mark.timeout(120)
def test_holding_batches_near_the_open_file_limit_keeps_them():
    """Kind D item 7: a caller that keeps every batch, with few descriptors left.

    The soft limit on open files is set 48 above what is open now, then 104
    zero-copy batches are read and held: each must load and keep its values.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cfg = Config(kind="batch_array", n=8, batch_size=1)
    try:
        with program(cfg) as p:
            p.read(0, negative=False, hold=True)  # starts the worker
            resource.setrlimit(resource.RLIMIT_NOFILE, (_procs.open_fds() + 48, hard))
            for _ in range(13):
                for batch in range(8):
                    p.read(batch, negative=False, hold=True)
                p.epoch_end()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


TORCH_PROGRAM = """
import warnings

import torch

# The training process's own torch work: torch's OpenMP pool now runs here.
torch.set_num_threads(2)
torch.matmul(torch.ones(300, 300), torch.ones(300, 300))

import test_differential as td

warnings.simplefilter("ignore")
cfg = td.Config(start_method=None, kind="torch", n=4, batch_size=2, num_workers=1)
with td.program(cfg) as p:
    # Started here, in the main thread alone: during a step the watchdog's
    # timer thread would make the default start method avoid fork.
    p.m.pf.worker_pids
    p.read(0, negative=False, hold=False)
    p.read(1, negative=False, hold=False)
print("DONE")
"""


@pytest.mark.timeout(120)
def test_default_start_method_after_torch_threads_does_not_hang(tmp_path):
    """Kind B item 3: the parent runs torch's (GNU OpenMP) thread pool.

    With the default start method and a loader running a torch op, reads
    must return `LoaderDataset`'s batches rather than hang in a forked
    worker. Run in a fresh interpreter: the pool would stay in this one.
    """
    pytest.importorskip("torch")
    result = _procs.run_script(tmp_path, textwrap.dedent(TORCH_PROGRAM), timeout=100)
    assert result.returncode == 0 and "DONE" in result.stdout, result.stderr[-3000:]

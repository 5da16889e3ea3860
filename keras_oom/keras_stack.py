"""Which of Keras's methods is calling, read from the Python stack.

A dataset's `on_epoch_begin`, `on_epoch_end` and `__getitem__` are called
by Keras's `fit`, `evaluate`, `predict` and its build and shape peeks alike;
`TrainingPasses` (`training_passes.py`) must tell them apart to count only
training's passes. Keras passes no such argument, so these functions walk
the caller's frames and recognise Keras's own code by its file (under
Keras's package directory) and its function's name:

- `_keras_frames`: the one walk, over Keras's own frames up to the
  innermost `fit` / `evaluate` / `predict` / build frame, that the others
  read;
- `_keras_caller`: the innermost `fit` / `evaluate` / `predict` / build
  frame, and whether an `EpochIterator.reset` lies within it;
- `_keras_frame`: that frame itself (`warn_if_resume_differs` reads its
  locals once);
- `_fit_iterator`: the running fit's `EpochIterator`: its adapter and the
  batches one Keras epoch consumes;
- `_read_context`: the caller as `_keras_caller` tells it, and the
  `PyDatasetAdapter` whose generator is reading (on TensorFlow, tf.data's
  thread), in one walk: it runs for every batch read.

Frames are matched by code name and file, never by `f_locals`, except in
the few frames named where the locals hold no batch: reading a frame's
locals leaves a snapshot on it that would keep batches (shared memory)
alive.

Imports Keras (for its directory), so workers must never import it.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterator
from types import FrameType
from typing import Any

import keras

# Keras methods whose calls are never training's: the build peek
# (`_symbolic_build`, TensorFlow's `_maybe_symbolic_build`), TensorFlow's
# shape peek at batches 0 and 1 (`get_tf_dataset`, also when fit builds its
# validation iterator), evaluate (also fit's validation) and predict.
_BUILD = frozenset({"_symbolic_build", "_maybe_symbolic_build", "get_tf_dataset"})
_OTHER_PASSES = frozenset({"evaluate", "predict"})
_NOT_TRAINING = _BUILD | _OTHER_PASSES

_KERAS_DIR = os.path.dirname(os.path.abspath(keras.__file__))
_KNOWN = _NOT_TRAINING | {"fit"}


def _keras_frames(frame: FrameType | None) -> Iterator[FrameType]:
    """Keras's own frames from `frame` outwards, up to and including the
    innermost fit / evaluate / predict / build frame (`_KNOWN`).

    Frames are told by their code's name and file, not by `f_locals`:
    reading a frame's locals makes Python keep a snapshot of them on the
    frame, which would keep the caller's batches (shared memory) alive.
    """
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(_KERAS_DIR):
            yield frame
            if code.co_name in _KNOWN:
                return
        frame = frame.f_back


def _keras_caller(frame: FrameType | None) -> tuple[str | None, bool]:
    """The innermost of Keras's own fit / evaluate / predict / build frames,
    and whether an `EpochIterator.reset` frame lies between it and `frame`."""
    via_reset = False
    for keras_frame in _keras_frames(frame):
        code = keras_frame.f_code
        if code.co_name in _KNOWN:
            return code.co_name, via_reset
        if code.co_name == "reset" and code.co_filename.endswith("epoch_iterator.py"):
            via_reset = True
    return None, False


_GENERATORS = frozenset({"_finite_generator", "_infinite_generator"})


def _fit_iterator(
    frame: FrameType | None, per_epoch: int | None
) -> tuple[weakref.ref | None, int | None]:
    """The running fit's training adapter (a weak reference) and the batches
    each of its Keras epochs consumes, from the `EpochIterator` whose
    `on_epoch_begin` is calling; `(None, None)` where Keras is not.

    Reads the `_enumerate_iterator` frame's `self`: its only local bound
    when it calls `on_epoch_begin`, so the snapshot of locals that reading
    leaves on the frame keeps no batch alive.
    """
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_enumerate_iterator" and code.co_filename.startswith(
            _KERAS_DIR
        ):
            iterator: Any = frame.f_locals.get("self")
            try:
                adapter = weakref.ref(iterator.data_adapter)
                spe = int(iterator.steps_per_execution or 1)
                steps = iterator.steps_per_epoch
            except (AttributeError, TypeError, ValueError):
                return None, None
            if not steps:  # a Keras epoch is a pass (or endless: not known)
                return adapter, per_epoch
            # Keras reads whole executions: ceil(steps / spe) of spe batches.
            return adapter, math.ceil(int(steps) / spe) * spe
        frame = frame.f_back
    return None, None


def _read_context(frame: FrameType | None) -> tuple[str | None, Any]:
    """`_keras_caller`'s caller, and the `PyDatasetAdapter` whose generator
    is reading (or None), in one walk of the stack.

    Keras's own generators (`_finite_generator`, `_infinite_generator`) read
    the dataset on whatever thread runs them: Keras's on JAX and torch,
    tf.data's on TensorFlow. A generator lies inside the `fit` /
    `evaluate` / `predict` frame that drives it, so the walk stops at that
    frame. The generators' locals are `self`, the indices and the index,
    never a batch, so reading them keeps nothing alive.
    """
    adapter = None
    for keras_frame in _keras_frames(frame):
        name = keras_frame.f_code.co_name
        if name in _KNOWN:
            return name, adapter
        if adapter is None and name in _GENERATORS:
            adapter = keras_frame.f_locals.get("self")
    return None, adapter


def _keras_frame(frame: FrameType | None) -> FrameType | None:
    """The innermost of Keras's own fit / evaluate / predict / build frames."""
    for keras_frame in _keras_frames(frame):
        if keras_frame.f_code.co_name in _KNOWN:
            return keras_frame
    return None

"""What the folder functions share (keras_oom/utils/directory.py), issue 15."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys

import _procs
import numpy as np
import pytest

from keras_oom.utils.directory import (
    FileDataset,
    PrefetchFileDataset,
    encode_labels,
)

SCRIPT = """
import os, sys, wave
import numpy as np
from PIL import Image
import keras_oom

root = os.path.abspath("data")
for name in ("a", "b"):
    for kind in ("img", "txt", "wav"):
        os.makedirs(os.path.join(root, kind, name), exist_ok=True)
    for k in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * k, np.uint8)).save(
            os.path.join(root, "img", name, f"{k}.jpg"))
        with open(os.path.join(root, "txt", name, f"{k}.txt"), "w") as f:
            f.write(name * k)
        with wave.open(os.path.join(root, "wav", name, f"{k}.wav"), "wb") as w:
            w.setnchannels(1); w.setsampwidth(2); w.setframerate(8000)
            w.writeframes(b"\\x01\\x02" * (k + 1))
with keras_oom.image_dataset_from_directory(
        os.path.join(root, "img"), image_size=(8, 8), batch_size=4,
        num_workers=1, verbose=False) as ds:
    assert ds[0][0].shape == (4, 8, 8, 3)
assert keras_oom.text_dataset_from_directory(
    os.path.join(root, "txt"), num_workers=0, verbose=False)[0][0].shape == (6,)
assert keras_oom.audio_dataset_from_directory(
    os.path.join(root, "wav"), num_workers=0, verbose=False)[0][0].shape == (6, 3, 1)
assert keras_oom.timeseries_dataset_from_array(
    np.arange(20), None, 4, batch_size=5)[0].shape == (5, 4)
heavy = sorted(m for m in ("tensorflow", "grain") if m in sys.modules)
print("imported:", heavy)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_four_functions_run_without_importing_tensorflow_or_grain(
    tmp_path, backend
):
    """Kind no TensorFlow: each function reads a batch; neither TF nor Grain loads."""
    pytest.importorskip("PIL")
    pytest.importorskip("cv2")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"the {backend} backend is not installed")
    path = _procs.write_script(tmp_path, SCRIPT)
    env = {**_procs.script_env(), "KERAS_BACKEND": backend}
    result = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported: []" in result.stdout


LAZY_SCRIPT = """
import sys
import keras_oom
import keras_oom.utils
print("eager:", sorted(m for m in sys.modules if m.startswith("keras_oom.utils.")
                       or m == "keras"))
for name in ("image_dataset_from_directory", "text_dataset_from_directory",
             "audio_dataset_from_directory", "timeseries_dataset_from_array"):
    assert name in keras_oom.__all__ and name in dir(keras_oom), name
    assert getattr(keras_oom, name) is getattr(keras_oom.utils, name), name
    module = sys.modules[getattr(keras_oom, name).__module__]
    assert module.__name__.startswith("keras_oom.utils."), module
for package in (keras_oom, keras_oom.utils):
    try:
        package.no_such_name
    except AttributeError as e:
        print("error:", e)
"""


@pytest.mark.timeout(60)
def test_package_names_the_utils_functions_lazily(tmp_path):
    """Kind lazy import: `keras_oom` and `keras_oom.utils` give the same functions.

    Importing either package imports no module of `keras_oom.utils` nor
    Keras (workers import the package); each function is imported on first
    use, and an unknown name raises the AttributeError of any module.
    """
    result = _procs.run_script(tmp_path, LAZY_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eager: []" in result.stdout
    assert "error: module 'keras_oom' has no attribute 'no_such_name'" in (
        result.stdout
    )
    assert "error: module 'keras_oom.utils' has no attribute 'no_such_name'" in (
        result.stdout
    )


@pytest.mark.parametrize(
    ("mode", "expected", "dtype"),
    [
        ("int", [2, 0, 1], np.int32),
        ("categorical", [[0, 0, 1], [1, 0, 0], [0, 1, 0]], np.float32),
        ("binary", [[2], [0], [1]], np.float32),
    ],
)
def test_labels_are_encoded_as_keras_yields_them(mode, expected, dtype):
    """Kind labels: Keras's dtypes and shapes for each label_mode."""
    out = encode_labels([2, 0, 1], mode, 3)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, expected)


def test_no_label_mode_means_no_labels():
    """Kind labels: label_mode=None drops the labels."""
    assert encode_labels([0, 1], None, 2) is None


def test_out_of_range_label_is_all_zeros_when_categorical():
    """Kind labels: as keras.ops.one_hot, a label >= num_classes is all zeros."""
    np.testing.assert_array_equal(encode_labels([5], "categorical", 3), [[0, 0, 0]])


@pytest.mark.parametrize("cls", [FileDataset, PrefetchFileDataset])
def test_dataset_classes_document_keras_attributes(cls):
    """Kind docs: each dataset class's help() text documents its own attributes.

    The Attributes section is written once and added to both docstrings:
    what `help()` shows must still be a complete Keras-style docstring.
    """
    doc = inspect.getdoc(cls)
    summary, _, rest = doc.partition("\n\n")
    assert summary.startswith(f"A `{cls.__mro__[1].__name__}` over files")
    attributes = rest[rest.index("Attributes:\n") :].splitlines()
    assert attributes[1].startswith("    class_names: The class names, in label order")
    assert any(
        line.startswith("    file_paths: The dataset's files") for line in attributes
    )
    assert set(cls.__annotations__) == {"class_names", "file_paths"}

"""`image_dataset_from_directory` against Keras's own, on a generated folder (issue 15).

Keras's `format="grain"` dataset is the reference: the same files, labels,
classes and split for the same arguments, and the same pixels (within a
mean absolute difference of 0.5 and a maximum of 4 on the 0-255 scale).
Keras resizes with the backend's resize, so the pixel comparisons run on
the JAX backend (the reference named in the issue) and skip on others.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import _utils_helpers as helpers
import keras
import numpy as np
import pytest

from keras_oom import LoaderDataset, PrefetchLoaderDataset, image_dataset_from_directory
from keras_oom.utils import FileReadError
from keras_oom.utils.directory import PrefetchFileDataset

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("cv2")

ON_JAX = keras.backend.backend() == "jax"
needs_jax = pytest.mark.skipif(
    not ON_JAX,
    reason="Keras's format='grain' resizes with the backend's own resize; the "
    "reference pixels are JAX's (no antialiasing, half-pixel centres)",
)


def _keras(directory, **kwargs):
    """Keras's format='grain' dataset (a list of two with subset='both')."""
    pytest.importorskip("grain")
    return keras.utils.image_dataset_from_directory(
        directory, format="grain", verbose=False, **kwargs
    )


def _batches(ds):
    return [
        tuple(np.asarray(p) for p in b) if isinstance(b, tuple) else (np.asarray(b),)
        for b in ds
    ]


def _ours(directory, **kwargs):
    kwargs.setdefault("num_workers", 0)
    return image_dataset_from_directory(directory, verbose=False, **kwargs)


def _all(ds):
    out = [ds[i] for i in range(len(ds))]
    return [b if isinstance(b, tuple) else (b,) for b in out]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three classes; JPEG, PNG (RGB, RGBA, L, 16-bit, palette), BMP, GIF.

    Also what Keras skips: a text file, a hidden directory, an upper-case
    extension it keeps, and a nested sub-folder it walks into.
    """
    root = tmp_path_factory.mktemp("images")
    Image = PIL
    files = {
        "a/a0.jpg": (Image.fromarray(helpers.smooth_image(40, 30, 3, 0)), {}),
        "a/a1.png": (Image.fromarray(helpers.smooth_image(25, 35, 4, 1), "RGBA"), {}),
        "a/a2.bmp": (Image.fromarray(helpers.smooth_image(33, 33, 3, 2)), {}),
        "a/a3.gif": (
            Image.fromarray(helpers.smooth_image(20, 28, 3, 3)).convert("P"),
            {},
        ),
        "b/b0.png": (Image.fromarray(helpers.smooth_image(30, 40, 1, 4)[..., 0]), {}),
        "b/b1.png": (
            Image.fromarray(
                helpers.smooth_image(22, 18, 1, 5, np.uint16, 65535)[..., 0]
            ),
            {},
        ),
        "b/b2.JPG": (Image.fromarray(helpers.smooth_image(50, 20, 3, 6)), {}),
        "b/sub/b3.jpeg": (Image.fromarray(helpers.smooth_image(64, 48, 3, 7)), {}),
        "c/c0.jpg": (Image.fromarray(helpers.smooth_image(17, 61, 3, 8)), {}),
        "c/c1.png": (Image.fromarray(helpers.smooth_image(48, 48, 3, 9)), {}),
        "c/c2.jpg": (Image.fromarray(helpers.smooth_image(29, 31, 3, 10)), {}),
        ".hidden/h0.png": (Image.fromarray(helpers.smooth_image(8, 8, 3, 11)), {}),
    }
    for name, (img, kw) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kw)
    (root / "a" / "notes.txt").write_text("not an image")
    return root


# -- files, labels, classes and split: Keras's own ---------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"shuffle": False},
        {"seed": 3, "validation_split": 0.3, "subset": "training"},
        {"seed": 3, "validation_split": 0.3, "subset": "validation"},
        {"labels": None},
        {"class_names": ["c", "a"]},
        {"labels": [0, 1, 0, 1, 0, 1, 0, 1, 2, 2, 2, 0], "label_mode": "categorical"},
    ],
    ids=[
        "default",
        "sorted",
        "training",
        "validation",
        "no-labels",
        "class-names",
        "given-labels",
    ],
)
def test_file_paths_class_names_and_labels_equal_keras(folder, kwargs):
    """Kind files: the same files, in the same order, with the same labels."""
    kwargs = {"seed": 7, **kwargs}
    ref = _keras(folder, image_size=(8, 8), batch_size=64, **kwargs)
    ours = _ours(folder, image_size=(8, 8), batch_size=64, **kwargs)
    assert ours.file_paths == ref.file_paths
    assert ours.class_names == ref.class_names
    assert sorted(ours.sample_ids) == sorted(ref.file_paths)
    if kwargs.get("labels", "inferred") is not None:
        # Labels per file, against Keras's batch in its unshuffled order.
        kwargs = {**kwargs, "shuffle": False}
        theirs = _keras(folder, image_size=(8, 8), batch_size=64, **kwargs)
        _, ref_y = _batches(theirs)[0]
        mine = _ours(folder, image_size=(8, 8), batch_size=64, **kwargs)
        y = mine[0][1]
        assert y.dtype == ref_y.dtype and y.shape == ref_y.shape
        assert mine.file_paths == theirs.file_paths
        np.testing.assert_array_equal(y, ref_y)


def test_subset_both_returns_training_and_validation_as_keras(folder):
    """Kind split: subset="both" is a pair; the last 25% validate, unshuffled."""
    kwargs = dict(seed=11, validation_split=0.25, subset="both", image_size=(8, 8))
    ref_train, ref_val = _keras(folder, **kwargs)
    train, val = _ours(folder, **kwargs)
    assert train.file_paths == ref_train.file_paths
    assert val.file_paths == ref_val.file_paths
    assert not set(train.file_paths) & set(val.file_paths)
    assert val.shuffle is False and train.shuffle is True
    assert list(val.sample_ids) == val.file_paths


@needs_jax
@pytest.mark.parametrize("label_mode", ["int", "categorical", "binary", None])
def test_label_modes_give_keras_dtypes_and_shapes(tmp_path, label_mode):
    """Kind labels: int32 (n,), float32 (n, classes), float32 (n, 1), or none."""
    for c, name in enumerate(["x", "y"]):
        (tmp_path / name).mkdir()
        for k in range(3):
            PIL.fromarray(helpers.smooth_image(10, 12, 3, 10 * c + k)).save(
                tmp_path / name / f"{k}.png"
            )
    kwargs = dict(label_mode=label_mode, image_size=(6, 6), batch_size=4, shuffle=False)
    ref = _batches(_keras(tmp_path, **kwargs))
    ours = _all(_ours(tmp_path, **kwargs))
    assert len(ours) == len(ref)
    for mine, theirs in zip(ours, ref, strict=True):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_allclose(a, b, atol=0.01)


# -- pixels: Keras's format="grain" ------------------------------------------

PIXEL_CASES = [
    dict(interpolation=i, **aspect)
    for i in ("bilinear", "nearest", "bicubic")
    for aspect in ({}, {"crop_to_aspect_ratio": True}, {"pad_to_aspect_ratio": True})
] + [
    dict(color_mode="grayscale"),
    dict(color_mode="rgba", pad_to_aspect_ratio=True),
    dict(data_format="channels_first", interpolation="bicubic"),
    dict(color_mode="grayscale", data_format="channels_first"),
    dict(interpolation="lanczos3", crop_to_aspect_ratio=True),
    dict(interpolation="lanczos5"),
]


UP_CASES = [dict(interpolation=i) for i in ("bilinear", "nearest", "bicubic")]
UP_CASES.append(dict(interpolation="bilinear", pad_to_aspect_ratio=True))


def _case_id(kwargs):
    return "-".join(k if isinstance(v, bool) else str(v) for k, v in kwargs.items())


@needs_jax
@pytest.mark.parametrize(
    ("kwargs", "image_size"),
    [(k, (24, 20)) for k in PIXEL_CASES] + [(k, (48, 64)) for k in UP_CASES],
    ids=[f"down-{_case_id(k)}" for k in PIXEL_CASES]
    + [f"up-{_case_id(k)}" for k in UP_CASES],
)
def test_images_equal_keras_grain_within_tolerance(folder, kwargs, image_size):
    """Kind pixels: mean |diff| <= 0.5 and max <= 4 against format="grain".

    Each file costs Keras a JAX compilation per case: the methods run on
    classes a and c (7 files: JPEG, PNG RGBA, BMP, GIF, wide and square),
    the colour modes on every file.
    """
    if "color_mode" not in kwargs:
        kwargs = dict(kwargs, class_names=["a", "c"])
    kwargs = dict(kwargs, image_size=image_size, shuffle=False, batch_size=4)
    ref = _batches(_keras(folder, **kwargs))
    ours = _all(_ours(folder, **kwargs))
    assert len(ours) == len(ref) > 1
    for (x, y), (rx, ry) in zip(ours, ref, strict=True):
        assert x.dtype == np.float32 and x.shape == rx.shape
        diff = np.abs(x - rx)
        assert diff.mean() <= 0.5 and diff.max() <= 4, (diff.mean(), diff.max())
        np.testing.assert_array_equal(y, ry)


@needs_jax
def test_sixteen_bit_grayscale_keeps_its_scale_as_keras(folder):
    """Kind pixels: a 16-bit PNG in grayscale stays on 0-65535, as in Keras."""
    kwargs = dict(
        color_mode="grayscale", image_size=(11, 9), shuffle=False, batch_size=None
    )
    keras_ds = _keras(folder, class_names=["b"], **kwargs)
    ref = dict(zip(keras_ds.file_paths, _batches(keras_ds), strict=True))
    ds = _ours(folder, class_names=["b"], **kwargs)
    path = next(p for p in ds.file_paths if p.endswith("b1.png"))
    x, y = ds[ds.file_paths.index(path)]
    assert x.max() > 255
    assert np.abs(x - ref[path][0]).max() <= 4


def _jpeg_variants(root: Path) -> dict[str, Path]:
    """JPEG files of one size (96 x 80), written the ways cameras and tools do.

    "detailed" is fine noise and edges at more than twice the output size
    of `_JPEG_SIZE`: a decoder that scaled it down while decoding (Pillow's
    `draft`, OpenCV's `IMREAD_REDUCED_*`) would smooth what Keras's resize
    (no antialiasing) keeps, far beyond the bound.
    """
    Image = PIL
    (root / "j").mkdir(parents=True)
    photo = Image.fromarray(helpers.smooth_image(96, 80, 3, 20))
    rng = np.random.default_rng(21)
    detail = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    detail[:, ::2] //= 4  # one-pixel stripes: what aliasing shows most
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": Keras (Pillow, TensorFlow) ignores it
    variants = {
        "420": (photo, dict(quality=90)),
        "444": (photo, dict(quality=95, subsampling=0)),
        "422": (photo, dict(quality=90, subsampling=1)),
        "progressive": (photo, dict(quality=90, progressive=True)),
        "grayscale": (photo.convert("L"), dict(quality=90)),
        "cmyk": (photo.convert("CMYK"), dict(quality=90)),
        "adobe-rgb": (photo, dict(quality=90, keep_rgb=True)),
        "exif-rotated": (photo, dict(quality=90, exif=exif.tobytes())),
        "detailed": (Image.fromarray(detail), dict(quality=90)),
    }
    paths = {}
    for name, (img, kw) in variants.items():
        paths[name] = root / "j" / f"{name}.jpg"
        img.save(paths[name], **kw)
    return paths


_JPEG_SIZE = (40, 32)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("jpegs")
    return root, _jpeg_variants(root)


@needs_jax
@pytest.mark.parametrize("color_mode", ["rgb", "grayscale", "rgba"])
@pytest.mark.parametrize(
    "variant",
    [
        "420",
        "444",
        "422",
        "progressive",
        "grayscale",
        "cmyk",
        "adobe-rgb",
        "exif-rotated",
        "detailed",
    ],
)
def test_jpeg_variants_equal_keras_grain_within_tolerance(jpegs, variant, color_mode):
    """Kind pixels: every kind of JPEG within the bound of format="grain".

    Chroma subsampling, progressive, grayscale, CMYK and Adobe RGB files,
    an EXIF orientation (which Keras ignores) and fine detail at more than
    twice the output size (where decoding at reduced scale is tempting):
    mean |diff| <= 0.5 and max <= 4 on each image.
    """
    root, paths = jpegs
    kwargs = dict(
        image_size=_JPEG_SIZE, batch_size=None, shuffle=False, color_mode=color_mode
    )
    keras_ds = _keras(root, **kwargs)
    ref = dict(zip(keras_ds.file_paths, _batches(keras_ds), strict=True))
    ds = _ours(root, **kwargs)
    path = str(paths[variant])
    x, _ = ds[ds.file_paths.index(path)]
    rx = ref[path][0]
    assert x.dtype == np.float32 and x.shape == rx.shape
    diff = np.abs(x - rx)
    assert diff.mean() <= 0.5 and diff.max() <= 4, (diff.mean(), diff.max())


def test_jpeg_over_pillows_pixel_limit_raises_as_keras(jpegs, monkeypatch):
    """Kind bad input: a JPEG over Pillow's decompression-bomb limit raises.

    Keras's grain path opens every file with Pillow, which refuses images of
    more than twice `PIL.Image.MAX_IMAGE_PIXELS`; a faster decoder must not
    read what Keras refuses.
    """
    root, paths = jpegs
    monkeypatch.setattr(PIL, "MAX_IMAGE_PIXELS", 1000)  # 96 x 80 > 2 x 1000
    ds = _ours(root, image_size=_JPEG_SIZE, batch_size=None, shuffle=False)
    path = str(paths["420"])
    with pytest.raises(FileReadError, match="decompression bomb") as info:
        ds[ds.file_paths.index(path)]
    assert info.value.path == path


# -- the pool on top ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_num_workers_picks_the_dataset_class(folder):
    """Kind num_workers: 0 -> LoaderDataset; None -> one per core; N -> N."""
    kwargs = dict(image_size=(8, 8), batch_size=2, seed=0)
    plain = _ours(folder, **kwargs)
    assert isinstance(plain, LoaderDataset)
    assert not isinstance(plain, PrefetchLoaderDataset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default warns about nothing
        default = image_dataset_from_directory(
            folder, verbose=False, **kwargs, num_workers=None
        )
    with default, _ours(folder, **kwargs, num_workers=2) as two:
        assert isinstance(default, PrefetchFileDataset)
        assert len(default.worker_pids) == min(
            len(os.sched_getaffinity(0)), len(default)
        )
        assert len(two.worker_pids) == 2
        for i in range(len(plain)):
            for a, b, c in zip(plain[i], default[i], two[i], strict=True):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)],
)
def test_bad_num_workers_raises_naming_it(folder, value, error):
    """Kind bad input: num_workers must be None or an integer >= 0."""
    with pytest.raises(error, match=r"`num_workers` must be None or an integer"):
        _ours(folder, num_workers=value)


@pytest.mark.timeout(60)
def test_augment_is_per_sample_and_independent_of_num_workers(folder):
    """Kind augment: the same draws for 0 and 2 workers; new ones per epoch."""
    kwargs = dict(
        image_size=(8, 8), batch_size=4, seed=5, augment=helpers.noise_augment
    )
    plain = _ours(folder, **kwargs)
    base = _ours(folder, **{**kwargs, "augment": None})
    with _ours(folder, **kwargs, num_workers=2) as pooled:
        first = [pooled[i][0] for i in range(len(pooled))]
        pooled.on_epoch_end()
        second = [pooled[i][0] for i in range(len(pooled))]
    expected = [plain[i][0] for i in range(len(plain))]
    offsets = np.concatenate(
        [(e - b[0])[:, 0, 0, 0] for e, b in zip(expected, _all(base), strict=True)]
    )
    assert len(set(offsets.tolist())) > 1  # one draw per image, not per batch
    for a, b in zip(first, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_augment_must_be_callable(folder):
    """Kind bad input: augment that is not callable is a TypeError naming it."""
    with pytest.raises(TypeError, match="`augment` must be callable"):
        _ours(folder, augment="flip")


def test_epochs_reshuffle_as_a_pure_function_of_seed(folder):
    """Kind shuffle: epoch orders differ, and repeat for the same seed."""
    kwargs = dict(image_size=(4, 4), batch_size=3, seed=9)
    one, two = _ours(folder, **kwargs), _ours(folder, **kwargs)
    orders = []
    for _ in range(3):
        orders.append([list(one.batch_ids(i)) for i in range(len(one))])
        assert orders[-1] == [list(two.batch_ids(i)) for i in range(len(two))]
        one.on_epoch_end()
        two.on_epoch_end()
    assert orders[0] != orders[1] != orders[2]
    assert sorted(sum(orders[1], [])) == sorted(one.file_paths)


def test_batch_size_none_yields_single_images(folder):
    """Kind batching: batch_size=None gives (image, label) without a batch axis."""
    ds = _ours(folder, image_size=(5, 7), batch_size=None, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a single sample has no rows to check
        x, y = ds[0]
    assert x.shape == (5, 7, 3) and y.shape == () and y.dtype == np.int32
    assert len(ds) == len(ds.file_paths) == 11


@pytest.mark.timeout(60)
def test_shards_split_the_files_between_processes(folder):
    """Kind shard: shard=(i, 2) reads disjoint halves of every epoch."""
    kwargs = dict(image_size=(4, 4), batch_size=2, seed=1, shard_mode="drop")
    parts = [_ours(folder, **kwargs, shard=(i, 2)) for i in range(2)]
    seen = [set(np.concatenate([p.batch_ids(i) for i in range(len(p))])) for p in parts]
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 10


@pytest.mark.timeout(90)
def test_workers_import_neither_keras_nor_a_backend(folder):
    """Kind worker imports: a fresh worker decodes and resizes without Keras."""
    with _ours(
        folder,
        image_size=(6, 6),
        batch_size=4,
        num_workers=1,
        start_method="subprocess",
        augment=helpers.imported_marker,
    ) as ds:
        x, _ = ds[0]
    assert x.reshape(len(x), -1)[:, 0].tolist() == [0.0] * 4


# -- bad input: Keras's errors ---------------------------------------------


def _same_error(call_keras, call_ours):
    with pytest.raises(Exception) as theirs:
        call_keras()
    with pytest.raises(type(theirs.value)) as mine:
        call_ours()
    assert str(mine.value) == str(theirs.value)
    return mine.value


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(labels="folders"),
        dict(labels=[0, 1], class_names=["a"]),
        dict(label_mode="sparse"),
        dict(color_mode="cmyk"),
        dict(image_size=(1, 2, 3)),
        dict(interpolation="cubic"),
        dict(validation_split=1.5, subset="training", seed=1),
        dict(validation_split=0.2),
        dict(subset="training"),
        dict(validation_split=0.2, subset="test", seed=1),
        dict(validation_split=0.2, subset="training"),
        dict(class_names=["a", "zz"]),
        dict(label_mode="binary"),
        dict(labels=[0, 1, 2]),
        dict(labels=None, class_names=["a"]),
    ],
    ids=lambda k: ",".join(k),
)
def test_bad_arguments_raise_keras_errors(folder, kwargs):
    """Kind bad input: the same exception type and message as Keras's."""
    err = _same_error(lambda: _keras(folder, **kwargs), lambda: _ours(folder, **kwargs))
    assert isinstance(err, ValueError)


def test_missing_directory_raises_as_keras(tmp_path):
    """Kind bad input: a missing directory is Keras's FileNotFoundError."""
    missing = tmp_path / "nowhere"
    err = _same_error(lambda: _keras(missing), lambda: _ours(missing))
    assert isinstance(err, FileNotFoundError)


def test_folder_without_images_raises_as_keras(tmp_path):
    """Kind bad input: no image files at all is Keras's ValueError."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("text")
    err = _same_error(lambda: _keras(tmp_path), lambda: _ours(tmp_path))
    assert "No images found" in str(err)


def test_crop_and_pad_together_is_a_value_error(folder):
    """Kind bad input: crop and pad contradict each other (Keras's message)."""
    with pytest.raises(ValueError, match="Only one of `pad_to_aspect_ratio`"):
        _ours(folder, crop_to_aspect_ratio=True, pad_to_aspect_ratio=True)


@pytest.mark.parametrize("name", ["area", "gaussian", "mitchellcubic"])
def test_tensorflow_only_interpolation_raises_naming_it(folder, name):
    """Kind bad input: TF-only methods are a ValueError naming `interpolation`."""
    with pytest.raises(ValueError, match=f"interpolation='{name}'"):
        _ours(folder, interpolation=name)


@pytest.mark.parametrize("size", [(0, 4), (4, -1), (4.5, 4)])
def test_non_positive_image_size_raises_naming_it(folder, size):
    """Kind bad input: image_size must be two positive integers."""
    with pytest.raises(ValueError, match=r"Invalid `image_size` value"):
        _ours(folder, image_size=size)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_image_raises_file_read_error_naming_its_path(
    tmp_path, num_workers, damage
):
    """Kind corrupt file: reading its batch raises FileReadError with the path."""
    (tmp_path / "a").mkdir()
    good = tmp_path / "a" / "0.jpg"
    PIL.fromarray(helpers.smooth_image(64, 64, 3, 0)).save(good, quality=95)
    bad = tmp_path / "a" / "1.jpg"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"junk" * 9)
    with _ours(
        tmp_path,
        image_size=(8, 8),
        batch_size=1,
        shuffle=False,
        num_workers=num_workers,
    ) as ds:
        assert ds[0][0].shape == (1, 8, 8, 3)
        with pytest.raises(FileReadError, match=r"Cannot read .*1\.jpg") as info:
            ds[1]
        assert info.value.path == str(bad)
        assert ds[0][0].shape == (1, 8, 8, 3)  # the dataset still serves


def test_missing_images_extra_raises_import_error_naming_it(folder, monkeypatch):
    """Kind missing extra: without OpenCV, an ImportError names the extra."""
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match=r"keras-oom\[images\]"):
        _ours(folder)


@pytest.mark.timeout(60)
# Forced on purpose: the hang needs fork (JAX's threads do not run in the child).
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_workers_forked_after_the_caller_resized_do_not_hang(tmp_path):
    """Kind fork safety: OpenCV used in the caller, then forked workers.

    Calling `cv2.setNumThreads` in a child forked after the parent ran
    OpenCV's thread pool blocks forever; the workers must not call it.
    """
    (tmp_path / "a").mkdir()
    for k in range(4):
        PIL.fromarray(helpers.smooth_image(256, 256, 3, k)).save(
            tmp_path / "a" / f"{k}.jpg"
        )
    kwargs = dict(image_size=(224, 224), batch_size=2, shuffle=False)
    expected = [b[0] for b in _all(_ours(tmp_path, **kwargs))]  # in this process
    with _ours(
        tmp_path, **kwargs, num_workers=1, start_method="fork", timeout=20
    ) as ds:
        for i, x in enumerate(expected):
            np.testing.assert_array_equal(ds[i][0], x)


@pytest.mark.parametrize("follow_links", [False, True])
def test_follow_links_indexes_as_keras(tmp_path, follow_links):
    """Kind files: symlinked sub-folders are followed exactly when Keras does."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    PIL.fromarray(helpers.smooth_image(9, 9, 3, 0)).save(elsewhere / "x.png")
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    PIL.fromarray(helpers.smooth_image(9, 9, 3, 1)).save(root / "a" / "y.png")
    (root / "a" / "more").symlink_to(elsewhere, target_is_directory=True)
    kwargs = dict(follow_links=follow_links, shuffle=False)
    ref = _keras(root, **kwargs)
    ours = _ours(root, **kwargs)
    assert ours.file_paths == ref.file_paths
    assert len(ours.file_paths) == (2 if follow_links else 1)


@pytest.mark.timeout(90)
def test_fit_reads_it_with_sync_epoch_and_reports_stats(folder):
    """Kind Keras: fit trains on it (SyncEpoch on), and stats() counts batches."""
    from keras_oom import SyncEpoch

    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with _ours(folder, image_size=(8, 8), batch_size=4, seed=0, num_workers=2) as ds:
        history = model.fit(
            ds, epochs=2, shuffle=False, verbose=0, callbacks=[SyncEpoch(ds)]
        )
        assert ds.epoch == 2
        assert ds.stats()["batches"] >= 2 * len(ds)
    assert len(history.history["loss"]) == 2

"""The benchmark's image folder workload still runs (issue 15).

No timing is asserted: these tests catch a broken workload or contender
before a long `nox -s bench` does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _utils_helpers as helpers
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report, targets  # noqa: E402
from benchmarks.contenders import (  # noqa: E402
    KERAS_FOLDER_GRAIN,
    KERAS_FOLDER_TF,
    OOM_FOLDER,
    Data,
)
from benchmarks.measure import run_contender  # noqa: E402
from benchmarks.workloads import FOLDER_SIDE, Workload, write_folder  # noqa: E402


@pytest.mark.timeout(90)
def test_keras_oom_folder_contender_runs_a_tiny_folder(tmp_path):
    """Kind benchmark: the folder contender reads every batch of 2 epochs."""
    PIL = pytest.importorskip("PIL.Image")
    pytest.importorskip("cv2")
    (tmp_path / "jpeg").mkdir()
    paths = []
    for k in range(16):
        path = tmp_path / "jpeg" / f"{k:05d}.jpg"
        PIL.fromarray(helpers.smooth_image(40, 40, 3, k)).save(path)
        paths.append(str(path))
    folder = write_folder(str(tmp_path), paths)
    assert len(list(Path(folder).glob("class_*/*.jpg"))) == 16
    w = Workload("tiny folder", "folder", batch_size=4, batches_per_epoch=4)
    result = run_contender(OOM_FOLDER, w, Data(folder=folder), epochs=2)
    assert [len(ep) for ep in result["epochs"]] == [4, 4]
    assert result["rate"] > 0
    assert result["pool_stats"]["cpu_ms_per_image"] > 0
    assert w.batch_bytes == 4 * FOLDER_SIDE * FOLDER_SIDE * 3 * 4


def _results(oom_rate: float) -> dict:
    cell = {"rate": 0.0, "first_batch": 0.5, "stall": 0.0, "interval": 0.01}
    return {
        "workloads": {"image folder": {"kind": "folder", "batch_size": 64}},
        "cells": {
            "image folder": {
                KERAS_FOLDER_TF: {**cell, "rate": 20.0},
                KERAS_FOLDER_GRAIN: {**cell, "rate": 5.0},
                OOM_FOLDER: {
                    **cell,
                    "rate": oom_rate,
                    "pool_stats": {"cpu_ms_per_image": 0.4},
                },
            }
        },
    }


def test_folder_targets_compare_with_both_keras_formats():
    """Kind benchmark: the issue's two targets, >= 1.5x tf and >= 5x grain."""
    rows = [t for t in targets.TARGETS if getattr(t, "workload", "") == "image folder"]
    res = _results(oom_rate=30.0)
    measured = [targets.evaluate(t, res) for t in rows]
    assert [(r.measured, r.passed) for r in measured] == [
        ("1.50x", True),
        ("6.00x", True),
    ]
    assert [targets.evaluate(t, _results(29.0)).passed for t in rows] == [False, True]


def test_folder_table_shows_images_per_second_and_ratios():
    """Kind benchmark: the report's folder table, images/s and both ratios."""
    table = report.folder_table(_results(oom_rate=30.0))
    line = next(row for row in table.splitlines() if row.startswith(f"| {OOM_FOLDER}"))
    assert "| 1920 | 1.50x | 6.00x | 0.40 | 0.50 |" in line

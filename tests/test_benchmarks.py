"""The benchmark package still runs: one contender in miniature, targets, report.

No timing is asserted (speed belongs in the benchmark itself); these tests
catch a benchmark broken by an API change before a long `nox -s bench` does.
Only numpy and Keras are needed: the optional contenders are not run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report, targets  # noqa: E402
from benchmarks.contenders import CONTENDERS, POOL, SERIAL, TFDATA, Data  # noqa: E402
from benchmarks.measure import run_contender  # noqa: E402
from benchmarks.workloads import Workload, write_rows  # noqa: E402


@pytest.mark.timeout(60)
def test_serial_contender_runs_a_tiny_row_workload(tmp_path):
    w = Workload("tiny", "rows", batch_size=4, batches_per_epoch=3, cpu_passes=1)
    data = Data(rows_path=write_rows(str(tmp_path), w.num_samples))
    result = run_contender(SERIAL, w, data, epochs=2)
    assert [len(ep) for ep in result["epochs"]] == [3, 3]
    assert result["rate"] > 0
    assert np.all(np.diff(np.concatenate(result["epochs"])) >= 0)


def test_contender_names_are_unique():
    names = [c.name for c in CONTENDERS]
    assert len(names) == len(set(names)), names


def _results(pool_rate: float) -> dict:
    cell = {"rate": 0.0, "first_batch": 0.0, "stall": 0.0, "interval": 0.01}
    return {
        "workloads": {"images, simplejpeg": {"kind": "images", "batch_bytes": 1}},
        "cells": {
            "images, simplejpeg": {
                SERIAL: {**cell, "rate": 10.0},
                POOL: {**cell, "rate": pool_rate},
                TFDATA: {**cell, "rate": 20.0},
            }
        },
    }


def test_ratio_target_passes_and_misses_on_the_measured_ratio():
    target = targets.Ratio("images, simplejpeg", targets.THE_POOL, TFDATA, 1.2)
    hit = targets.evaluate(target, _results(pool_rate=24.0))
    miss = targets.evaluate(target, _results(pool_rate=23.0))
    assert (hit.passed, hit.measured) == (True, "1.20x")
    assert (miss.passed, miss.measured) == (False, "1.15x")
    # The best configuration is not in the run, so the plain pool stands in.
    assert POOL in hit.text


def test_target_without_its_contender_is_not_measured():
    target = targets.Ratio("transfer-bound", targets.THE_POOL, SERIAL, 1.0)
    row = targets.evaluate(target, _results(pool_rate=1.0))
    assert row.passed is None and row.result == "not measured"


def test_splice_replaces_only_the_generated_part():
    page = f"# Title\n\nhand\n\n{report.BEGIN_MARK}\nold\n{report.END_MARK}\n\nkept\n"
    out = report.splice(page, "new")
    assert "old" not in out
    assert out.startswith("# Title\n\nhand\n\n") and out.endswith("\n\nkept\n")
    assert "\nnew\n" in out
    with pytest.raises(ValueError, match="no generated part"):
        report.splice("# no markers", "new")

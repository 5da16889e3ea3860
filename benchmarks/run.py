"""Runs the whole benchmark and writes its report.

Writes the data once (the rows' `.npy` file and the JPEG crops) to a
temporary directory, then for every workload, repeat and contender starts a
fresh interpreter (`python -m benchmarks.measure`) that measures one
contender once. The repeats are interleaved contender by contender, so that
drift on a shared machine hits every contender alike; a cell is the median of
its repeats. Then one `model.fit` run and the parent's memory over many
epochs, each in a fresh interpreter too.

Writes `results.json` (every measurement), the generated section of
`performance.md` and the charts. A full run writes into the repository
(`benchmarks/results.json`, `docs/`); `--quick` writes to a temporary
directory unless `--out` says otherwise. `--render-only` re-renders the page
from an existing JSON without measuring.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report, targets
from benchmarks.contenders import CONTENDERS, NUM_WORKERS, SERIAL
from benchmarks.workloads import (
    Workload,
    make_workloads,
    write_folder,
    write_jpegs,
    write_rows,
)

ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    env.setdefault("KERAS_BACKEND", "jax")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def measure(spec: dict[str, Any], tmp: str, timeout: float = 900) -> dict[str, Any]:
    """Runs one spec in a fresh interpreter; returns its JSON result."""
    fd, spec_path = tempfile.mkstemp(suffix=".json", dir=tmp)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    out_path = spec_path.replace(".json", ".out.json")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.measure", spec_path, out_path],
        env=child_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"measuring {spec.get('contender', spec['experiment'])} on "
            f"{spec['workload']['name']} failed (exit {proc.returncode}):\n"
            + proc.stdout[-4000:]
        )
    with open(out_path) as f:
        return json.load(f)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell: the medians over a contender's repeats on one workload."""
    med = statistics.median
    stats_keys = runs[0]["pool_stats"].keys()
    return {
        "rate": med(r["rate"] for r in runs),
        "rates": [r["rate"] for r in runs],
        "first_batch": med(r["first_batch"] for r in runs),
        "stall": med(r["stall"] for r in runs),
        "interval": med(r["interval"] for r in runs),
        "parent_mib": med(r["parent_delta"] for r in runs) / 2**20,
        "workers_mib": med(r["workers_pss"] for r in runs) / 2**20,
        "note": runs[-1]["note"],
        "pool_stats": {k: med(r["pool_stats"][k] for r in runs) for k in stats_keys},
    }


def git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "keras_oom"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes to keras_oom/" if dirty else "")


def versions() -> str:
    """Versions of everything measured, read in a child (imports are heavy)."""
    code = (
        "import importlib.metadata as m\n"
        "names = ['numpy', 'keras', 'jax', 'torch', 'tensorflow-cpu', 'grain',"
        " 'pillow', 'simplejpeg', 'keras-oom']\n"
        "out = []\n"
        "for n in names:\n"
        "    try: out.append(f'{n} {m.version(n)}')\n"
        "    except m.PackageNotFoundError: out.append(f'{n} not installed')\n"
        "print(', '.join(out))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env()
    ).stdout.strip()


def machine() -> list[str]:
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return [
        f"- CPU cores (`nproc`): {len(os.sched_getaffinity(0))}; RAM "
        f"{mem_kib / 2**20:.0f} GiB; {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; {versions()} (git {git_state()}); "
        f"Keras backend {child_env()['KERAS_BACKEND']}",
        f"- Date: {datetime.date.today().isoformat()}; load average at the end of "
        f"the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"(other jobs share the machine)",
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measures everything `args` asks for; returns the results as JSON data."""
    workloads = [
        w
        for w in make_workloads(args.quick)
        if not args.workloads or any(s in w.name for s in args.workloads)
    ]
    contenders = [
        c.name
        for c in CONTENDERS
        if not args.contenders
        or c.name == SERIAL
        or any(s in c.name for s in args.contenders)
    ]
    cells: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    res: dict[str, Any] = {
        "args": {"quick": args.quick, "repeats": args.repeats, "epochs": args.epochs},
        "num_workers": NUM_WORKERS,
        "cores": len(os.sched_getaffinity(0)),
        "workloads": {
            w.name: {
                **dataclasses.asdict(w),
                "batch_bytes": w.batch_bytes,
                "description": w.describe(),
            }
            for w in workloads
        },
        "cells": cells,
        "skipped": skipped,
    }
    with tempfile.TemporaryDirectory(prefix="keras_oom_bench_") as tmp:
        rows = [w for w in workloads if w.kind == "rows"]
        images = [w for w in workloads if w.kind in ("images", "folder")]
        data = {
            "rows_path": write_rows(tmp, max(w.num_samples for w in rows))
            if rows
            else "",
            "jpeg_paths": write_jpegs(tmp, max(w.num_samples for w in images))
            if images
            else [],
        }
        if any(w.kind == "folder" for w in workloads):
            data["folder"] = write_folder(tmp, data["jpeg_paths"])
        log(f"data written to {tmp}")

        def spec(w: Workload, experiment: str, **kw: Any) -> dict[str, Any]:
            return {
                "experiment": experiment,
                "workload": dataclasses.asdict(w),
                "data": data,
                "epochs": args.epochs,
                **kw,
            }

        for w in workloads:
            runs: dict[str, list[dict[str, Any]]] = {}
            mine = [c for c in contenders if w.kind in _kinds(c)]
            for rep in range(args.repeats):
                for c in mine:  # interleaved, so drift hits everyone alike
                    if c in skipped:
                        continue
                    r = measure(spec(w, "contender", contender=c), tmp)
                    if "skipped" in r:
                        skipped[c] = r["skipped"]
                        log(f"  skipping {c}: {r['skipped']}")
                        continue
                    runs.setdefault(c, []).append(r)
                    unit = 1 if w.kind == "rows" else w.batch_size
                    log(
                        f"  {w.name:20s} rep {rep + 1}/{args.repeats} {c:42s} "
                        f"{r['rate'] * unit:8.1f} {w.unit}"
                    )
            cells[w.name] = {c: summarise(rs) for c, rs in runs.items()}
        names = {w.name: w for w in workloads}
        if not args.skip_extras and "latency-bound" in names:
            log("  model.fit through the pool")
            res["fit"] = measure(
                {**spec(names["latency-bound"], "fit"), "epochs": max(2, args.epochs)},
                tmp,
            )
        if not args.skip_extras and "transfer-bound" in names:
            log("  memory over epochs")
            res["memory"] = measure(
                {
                    **spec(names["transfer-bound"], "memory"),
                    "epochs": 5 if args.quick else 20,
                },
                tmp,
            )["rss"]
    res["machine"] = machine()
    return res


def _kinds(name: str) -> tuple[str, ...]:
    return next(c.kinds for c in CONTENDERS if c.name == name)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_outputs(res: dict[str, Any], json_path: Path, docs: Path) -> None:
    """Evaluates the targets and writes the JSON, the page and the charts."""
    rows = targets.evaluate_all(res)
    res["targets"] = [dataclasses.asdict(r) | {"result": r.result} for r in rows]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    section = report.render(res, rows)
    docs.mkdir(parents=True, exist_ok=True)
    page = docs / "performance.md"
    if page.exists() and report.BEGIN_MARK in page.read_text():
        page.write_text(report.splice(page.read_text(), section))
    else:
        (docs / "performance-results.md").write_text(section + "\n")
    report.plot_rows(res, docs / "performance.png")
    report.plot_images(res, docs / "performance-images.png")
    print(report.image_table(res))
    print()
    print(report.row_table(res))
    print()
    print(report.targets_table(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run (3 repeats)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats per cell")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per repeat")
    parser.add_argument(
        "--workloads", nargs="*", help="only workloads whose name contains one of these"
    )
    parser.add_argument(
        "--contenders",
        nargs="*",
        help="only contenders whose name contains one of these (serial always runs)",
    )
    parser.add_argument(
        "--skip-extras", action="store_true", help="skip model.fit and memory runs"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the page and charts"
    )
    parser.add_argument(
        "--render-only",
        type=Path,
        default=None,
        metavar="JSON",
        help="re-render the page from a results JSON, measuring nothing",
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.epochs = args.epochs or (2 if args.quick else 3)
    if args.repeats < 1 or args.epochs < 1:
        parser.error("--repeats and --epochs must be at least 1")
    if args.out is None:
        args.out = (
            Path(tempfile.mkdtemp(prefix="keras_oom_bench_quick_"))
            if args.quick
            else ROOT / "docs"
        )
    json_path = (
        ROOT / "benchmarks" / "results.json"
        if args.out == ROOT / "docs"
        else args.out / "results.json"
    )
    if args.render_only:
        res = json.loads(args.render_only.read_text())
        write_outputs(res, json_path, args.out)
        return 0
    started = time.perf_counter()
    res = run(args)
    write_outputs(res, json_path, args.out)
    log(f"\n{time.perf_counter() - started:.0f} s; wrote {json_path} and {args.out}")
    return 0

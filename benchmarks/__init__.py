"""keras-oom's throughput benchmark: the pool against the alternatives.

Run from the repository root: ``python -m benchmarks`` (``nox -s bench``), or
``python -m benchmarks --quick`` for a short smoke run.

Modules: `workloads` (the data and loaders), `contenders` (every way of
feeding batches, behind one interface), `measure` (one contender once, in a
fresh interpreter), `probes` (memory and process probes, from /proc),
`targets` (the targets, as data), `report` (tables, charts and the generated
part of docs/performance.md), `run` (the whole benchmark).
"""

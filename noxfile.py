"""Nox sessions for keras-oom.

Run ``nox`` for the default sessions (tests, lint, typecheck), or pick one with
``nox -s NAME``. Only Python and pip are needed: environments are created with
the standard-library ``venv`` module.
"""

from __future__ import annotations

import nox
from nox.command import CommandFailed

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False

# Pinned so pip picks the CPU-only build instead of pulling GBs of CUDA wheels.
TORCH = "torch==2.13.0"
TENSORFLOW = "tensorflow-cpu"
# Linters pinned so that a new release cannot fail CI on unchanged code.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"


def _run_tests(session: nox.Session, backend: str, *extra_deps: str) -> None:
    """Install the package with its test extra and run pytest on ``backend``."""
    session.install(".[test]", *extra_deps)
    session.run("pytest", *session.posargs, env={"KERAS_BACKEND": backend})


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite on the JAX backend (the default)."""
    _run_tests(session, "jax")


@nox.session(name="tests-jax")
def tests_jax(session: nox.Session) -> None:
    """Run the test suite on the JAX backend."""
    _run_tests(session, "jax")


@nox.session(name="tests-torch")
def tests_torch(session: nox.Session) -> None:
    """Run the test suite on the PyTorch backend (CPU build)."""
    _run_tests(session, "torch", TORCH)


@nox.session(name="tests-tensorflow")
def tests_tensorflow(session: nox.Session) -> None:
    """Run the test suite on the TensorFlow backend (CPU build)."""
    _run_tests(session, "tensorflow", TENSORFLOW)


@nox.session(name="tests-ray")
def tests_ray(session: nox.Session) -> None:
    """Run the Ray executor's tests on a local Ray instance (JAX backend).

    tests/test_ray.py and the Ray parameter of tests/test_executor.py's
    contract tests, in a session of their own: the default sessions do not
    install Ray (they skip these tests, saying why), and the local pool's
    tests that fork must not share a process with a Ray driver.
    """
    session.install(".[test,ray]")
    session.run(
        "pytest",
        "tests/test_ray.py",
        "tests/test_executor.py",
        "-k",
        "ray",
        *session.posargs,
        env={"KERAS_BACKEND": "jax"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy."""
    session.install(".", MYPY)
    session.run("mypy", "keras_oom")


@nox.session
def demo(session: nox.Session) -> None:
    """Train a small model on scikit-learn's digits through PrefetchLoaderDataset."""
    session.install(".[demo]")
    session.run("python", "examples/digits_demo.py", env={"KERAS_BACKEND": "jax"})


@nox.session
def bench(session: nox.Session) -> None:
    """Run the throughput benchmark; `nox -s bench -- --quick` for a short run.

    The bench extra brings TensorFlow, Grain, simplejpeg, Pillow and
    scikit-image; torch is pinned to its CPU build and optional (its
    contender is skipped, with the reason printed, if it cannot install).
    """
    session.install(".[bench]", "jax[cpu]")
    try:
        session.install(TORCH)
    except CommandFailed:
        session.warn(f"could not install {TORCH}; benchmarking without torch")
    session.run("python", "-m", "benchmarks", *session.posargs)

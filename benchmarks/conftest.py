"""Benchmarks run only on request: ``pytest --benchmark-only`` (or ``--benchmark-enable``).

The plain ``python -m pytest`` collects ``benchmarks/`` too (``testpaths``) but
deselects every item in it, so the test run stays fast; under
``--benchmark-only`` the tests without a benchmark are deselected rather than
listed one by one as skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks._runs import TINY_RUN, run_directory

HERE = Path(__file__).resolve().parent

def pytest_addoption(parser):
    group = parser.getgroup("uqsynth benchmarks")
    group.addoption(
        "--uqsynth-run",
        default=None,
        metavar="RUN",
        help="a finished `uqsynth run` directory for benchmarks/test_quality.py "
        "(default: $UQSYNTH_BENCH_RUN, else a tiny run trained once per session)",
    )


def benchmarks_requested(config) -> bool:
    return bool(config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False))


def _is_benchmark(item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config, items):
    if benchmarks_requested(config):
        if not config.getoption("benchmark_only", False):
            return
        drop = [item for item in items if "benchmark" not in getattr(item, "fixturenames", ())]
    else:
        drop = [item for item in items if _is_benchmark(item)]
    if drop:
        dropped = set(map(id, drop))
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if id(item) not in dropped]


def pytest_report_header(config):
    if not benchmarks_requested(config):
        return "benchmarks/: deselected (run them with `pytest --benchmark-only`, see benchmarks/README.md)"
    return None


@pytest.fixture(scope="session")
def trained_run(request, tmp_path_factory) -> Path:
    """The run directory of the accuracy-and-calibration suite (a tiny one is trained once if none is given)."""
    given = run_directory(request.config)
    if given is not None:
        if not (given / "config.toml").is_file():
            pytest.exit(f"error: {given}: not a run directory (no config.toml)", returncode=4)
        return given
    from uqsynth.cli import main

    root = tmp_path_factory.mktemp("bench-run")
    config = root / "tiny.toml"
    config.write_text(TINY_RUN)
    status = main(["run", str(config), "--out", str(root / "run"), "--device", "cpu"])
    if status != 0:
        pytest.exit(f"error: training the tiny run failed with status {status}", returncode=4)
    return root / "run"

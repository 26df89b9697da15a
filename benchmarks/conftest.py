"""Shared by every benchmarks/bench_<op>.py: collects those files (pytest's default pattern is
test_*.py), and records results: the fixture `record_result` adds the test's row to its module's
results, and at the end of the session each module's rows go to one JSON file,
benchmarks/results/<op>-<gpu or cpu>-<date>.json (<op>: the module's name without "bench_"),
with the GPU, the library versions and the date.

A row is the benchmark's parameters, its `benchmark.extra_info` (ratios, peak memory, shapes: what
the module puts there) and its timing statistics in seconds. A module opts in with
`pytestmark = pytest.mark.usefixtures("record_result")` (or by requesting the fixture); a skipped,
failed or `--benchmark-disable`d benchmark leaves no row.

`--methods-scale` (the fixture `methods_scale`) says how much work bench_methods.py's erasures do.
"""

from __future__ import annotations

import datetime
import itertools
import json
import platform
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
_TIMING_FIELDS = ("min", "median", "mean", "stddev", "max", "rounds")
_ROWS: dict[str, list[dict]] = defaultdict(list)


def pytest_addoption(parser):
    parser.addoption(
        "--methods-scale", choices=("smoke", "quick", "full"), default=None,
        help="bench_methods.py: how much work each erasure does (default: smoke with --benchmark-disable, else full)",
    )


@pytest.fixture(scope="session")
def methods_scale(request) -> str:
    scale = request.config.getoption("--methods-scale")
    if scale is None:
        scale = "smoke" if request.config.getoption("benchmark_disable") else "full"
    return scale


def pytest_collect_file(parent, file_path):
    # Paths named on the command line are collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def record_result(request, benchmark):
    """Adds this test's row to its module's results once the test has run its benchmark."""
    yield
    if benchmark.stats is None:
        return
    timing = benchmark.stats.stats
    params = getattr(request.node, "callspec", None)
    _ROWS[request.module.__name__.rsplit(".", 1)[-1].removeprefix("bench_")].append({
        "test": request.node.name,
        "params": {k: _plain(v) for k, v in params.params.items()} if params else {},
        **{k: _plain(v) for k, v in benchmark.extra_info.items()},
        "seconds": {field: getattr(timing, field) for field in _TIMING_FIELDS},
    })


def _plain(value):
    return value if isinstance(value, (bool, int, float, str, type(None), list, dict)) else str(value)


def environment() -> dict:
    """What a recorded run ran on."""
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    env = environment()
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", env["gpu"] or "cpu").strip("-")
    RESULTS.mkdir(exist_ok=True)
    for op, rows in _ROWS.items():
        # A run never overwrites another's record (one of another machine, the same day).
        stem = f"{op}-{gpu}-{env['date'][:10]}"
        path = RESULTS / f"{stem}.json"
        for n in itertools.count(2):
            if not path.exists():
                break
            path = RESULTS / f"{stem}-{n}.json"
        path.write_text(json.dumps({"op": op, **env, "rows": rows}, indent=1) + "\n")
        print(f"\nbenchmarks: {len(rows)} results in {path}")

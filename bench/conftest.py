"""Hooks and fixtures of the throughput benchmarks (helpers live in bench/harness.py).

- ``peak_gflops``: this run's matmul GFLOP/s per device, filled by ``test_matmul_peak``,
  which is moved to the front of the run so later results can divide by it.
- machine_info gains torch version, threads, CPU model, CUDA device and a machine label.
- ``pytest bench/ ...`` times benchmarks although the project's ``addopts`` has
  ``--benchmark-skip`` (that is for the test suite); ``--benchmark-skip`` given on the
  command line is still honoured.
- ``--benchmark-compare`` with no saved run prints a clear note and runs without comparing,
  instead of pytest-benchmark's crash.
"""

from __future__ import annotations

import os
import platform
import warnings

import pytest

from widedeep import fused
from widedeep.env import environment


@pytest.fixture(scope="session")
def peak_gflops() -> dict[str, float]:
    """device -> matmul GFLOP/s measured earlier in this session (filled by the peak bench)."""
    return {}


# ------------------------------------------------------------------ machine_info


def machine_label(env: dict) -> str:
    """A human name for the machine: $WIDEDEEP_MACHINE, else CPU model, cores and GPU."""
    if os.environ.get("WIDEDEEP_MACHINE"):
        return os.environ["WIDEDEEP_MACHINE"]
    gpu = env["cuda_device"] or "no GPU"
    return f"{env['cpu_model']}, {env['cpu_count']} cores, {gpu} ({platform.node()})"


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Add torch version, thread count, CPU model and CUDA device to ``machine_info``."""
    fused.library()  # so that machine_info says whether the compiled step was available
    env = environment()
    machine_info.update({k: v for k, v in env.items() if k not in machine_info})
    machine_info["machine_label"] = machine_label(env)


# ------------------------------------------------------------------ command-line behaviour

_STORAGE = pytest.StashKey[str]()  # where --benchmark-compare looked
_NOTE = pytest.StashKey[str]()  # the note shown when there was nothing to compare with
PEAK_TEST = "test_matmul_peak"  # runs first, so later results can divide by its GFLOP/s


def _saved_runs(config) -> list | None:
    """Saved runs ``--benchmark-compare`` would load; None when that can't be checked here."""
    from pytest_benchmark.logger import Logger
    from pytest_benchmark.utils import get_machine_id, load_storage

    where = config.getoption("benchmark_storage")
    if "://" in where and not where.startswith("file://"):
        return None
    storage = load_storage(where, logger=Logger(Logger.QUIET), netrc=None,
                           default_machine_id=get_machine_id())
    compare = config.getoption("benchmark_compare")
    runs = list(storage.load()) if compare is True else list(storage.load(compare))
    config.stash[_STORAGE] = str(storage.path)
    return runs


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    """Run before pytest-benchmark's own configure (which is trylast)."""
    args = config.invocation_params.args
    if not any(a.startswith("--benchmark-skip") for a in args):
        config.option.benchmark_skip = False  # addopts' skip is for the test suite, not bench/
    # A saved run from another machine is expected to differ: say so, don't crash (-W error).
    from pytest_benchmark.logger import PytestBenchmarkWarning
    warnings.filterwarnings("default", message="Benchmark machine_info is different",
                            category=PytestBenchmarkWarning)
    if config.getoption("benchmark_compare", None) and _saved_runs(config) == []:
        want = config.getoption("benchmark_compare")
        what = "no saved run" if want is True else f"no saved run matching {want!r}"
        note = (f"--benchmark-compare: {what} in {config.stash[_STORAGE]}; running without "
                "a comparison. Save one first: pytest bench/ -m quick --benchmark-autosave")
        if config.getoption("benchmark_compare_fail", None):
            note += " (--benchmark-compare-fail ignored too)"
            config.option.benchmark_compare_fail = None
        config.option.benchmark_compare = None
        config.stash[_NOTE] = note


def pytest_collection_modifyitems(config, items: list) -> None:
    """Run the matmul-peak benchmarks before everything else (a stable sort)."""
    items.sort(key=lambda item: getattr(item, "originalname", "") != PEAK_TEST)


def pytest_report_header(config) -> str | None:
    return config.stash.get(_NOTE, None)


def pytest_terminal_summary(terminalreporter, config) -> None:
    note = config.stash.get(_NOTE, None)
    if note:
        terminalreporter.write_line(note, yellow=True, bold=True)

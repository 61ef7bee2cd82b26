"""The benchmark module runs (once, untimed) in the normal test run, and a tiny timed run
writes the JSON the analysis reads. Benchmarks run in a child pytest: bench/ has its own
conftest, and the suite's ``--benchmark-skip`` must not leak into it. No absolute times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = "peak or lecture or sklearn or d1-w8"  # -k: a few fast cases of the quick subset

pytestmark = pytest.mark.slow


def run_bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m pytest bench/ ARGS`` from the project root; never downloads data."""
    env = dict(os.environ)
    if not env.get("WIDEDEEP_DATA"):
        env["WIDEDEEP_DATA"] = str(tmp_path)  # an empty folder: the references skip
    cmd = [sys.executable, "-m", "pytest", "bench/", "-p", "no:cacheprovider", "-rs", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_quick_subset_runs_once_untimed(tmp_path):
    out = run_bench("-m", "quick", "--benchmark-disable", tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout


def test_timed_run_without_saved_run_to_compare(tmp_path):
    """--benchmark-compare with an empty storage: a clear note, not pytest-benchmark's crash."""
    report = tmp_path / "run.json"
    out = run_bench("-m", "quick", "-k", TINY, "--benchmark-compare",
                    f"--benchmark-storage={tmp_path / 'storage'}", "--benchmark-max-time=0.02",
                    "--benchmark-min-rounds=2", f"--benchmark-json={report}", tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no saved run" in out.stdout and "running without a comparison" in out.stdout
    if not torch.cuda.is_available():  # the CUDA cases skip, saying why
        assert "SKIPPED" in out.stdout and "CUDA is not available" in out.stdout
    run = json.loads(report.read_text())
    info = run["machine_info"]
    for key in ("torch_version", "threads", "cpu_model", "cuda_device", "machine_label"):
        assert key in info, key
    by_kind = {b["extra_info"]["kind"]: b["extra_info"] for b in run["benchmarks"]}
    assert {"peak", "step"} <= set(by_kind)
    step, peak = by_kind["step"], by_kind["peak"]
    assert step["samples_per_s"] > 0 and step["flops_per_step"] > 0
    assert step["fraction_of_peak"] == pytest.approx(step["gflops_per_s"] / peak["gflops_per_s"])


def test_compare_against_a_saved_run(tmp_path):
    """--benchmark-autosave, then --benchmark-compare against it (machine_info matches)."""
    storage = f"--benchmark-storage={tmp_path / 'storage'}"
    fast = ("-m", "quick", "-k", "d1-w8-b64", "--benchmark-max-time=0.02", storage)
    first = run_bench(*fast, "--benchmark-autosave", tmp_path=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:]
    second = run_bench(*fast, "--benchmark-compare", tmp_path=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "(0001_" in second.stdout  # the saved run's column in the comparison table

"""analysis.throughput on a real (tiny) benchmark run: tables, valid PNGs, numbers that match
the JSON. The run is made by pytest-benchmark in a child process, not typed by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from tabular import read_table

from analysis.throughput import build, load, sweep_commands

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> Path:
    """A timed run of a few quick CPU cases (two depths, two widths, peak) as JSON."""
    folder = tmp_path_factory.mktemp("bench")
    report = folder / "cpu.json"
    env = dict(os.environ, WIDEDEEP_DATA=os.environ.get("WIDEDEEP_DATA") or str(folder))
    cmd = [sys.executable, "-m", "pytest", "bench/", "-p", "no:cacheprovider", "-q",
           "-m", "quick", "-k", "cpu and (peak or d1-w8 or d1-w64 or d4-w8 or d4-w64)"
           " or lecture_plain or lecture_batched",
           "--benchmark-max-time=0.02", "--benchmark-min-rounds=2",
           f"--benchmark-json={report}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return report


def results_with(tmp_path: Path, *runs: tuple[str, dict]) -> Path:
    """A results/ folder whose benchmarks/ holds the given (file name, JSON) runs."""
    bench = tmp_path / "results" / "benchmarks"
    bench.mkdir(parents=True)
    for name, run in runs:
        (bench / name).write_text(json.dumps(run))
    return tmp_path / "results"


def as_cuda(run: dict, factor: float) -> dict:
    """The same run relabelled as CUDA with every throughput ``factor`` times higher."""
    run = json.loads(json.dumps(run))
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        info["device"] = "cuda"
        if bench.get("params"):
            bench["params"]["device"] = "cuda"
        for key in ("samples_per_s", "gflops_per_s"):
            if info.get(key) is not None:
                info[key] *= factor
    return run


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 100 and width > 100


def test_cpu_only_tables_figures_and_note(cpu_run, tmp_path):
    run = json.loads(cpu_run.read_text())
    out = build(results_with(tmp_path, ("cpu-quick.json", run)))
    names = {Path(p).name for p in out["tables"] + out["figures"]}
    assert {"throughput.csv", "throughput.md", "throughput_samples_vs_width.png",
            "throughput_fraction_of_peak.png"} <= names
    assert "throughput_speedup.png" not in names
    for path in out["figures"]:
        assert_png(Path(path))
    assert any("No CUDA benchmark results" in n and "GPU machine" in n for n in out["notes"])
    assert out["machines"][0]["label"] == run["machine_info"]["machine_label"]


def test_table_numbers_equal_the_json(cpu_run, tmp_path):
    run = json.loads(cpu_run.read_text())
    out = build(results_with(tmp_path, ("cpu-quick.json", run)))
    table = read_table(next(p for p in out["tables"] if Path(p).name == "throughput.csv"))
    peak = next(b for b in run["benchmarks"] if b["extra_info"]["kind"] == "peak")
    step = next(b for b in run["benchmarks"] if b["name"] == "test_step[d4-w64-bfull-cpu]")
    row = table.set_index("name").loc[step["name"]]
    assert row["samples_per_s"] == step["extra_info"]["samples_per_s"]
    assert row["median_s"] == step["stats"]["median"]
    expected = step["extra_info"]["gflops_per_s"] / peak["extra_info"]["gflops_per_s"]
    assert row["fraction_of_peak"] == pytest.approx(expected, rel=1e-12)
    best = (step["extra_info"]["flops_per_step"] / step["stats"]["min"]) / (
        peak["extra_info"]["flops_per_step"] / peak["stats"]["min"])
    assert row["fraction_of_peak_best"] == pytest.approx(best, rel=1e-12)
    md = next(Path(p) for p in out["tables"] if Path(p).name == "throughput.md").read_text()
    assert f"{step['extra_info']['samples_per_s']:,.0f}" in md


def test_engine_table_compares_batched_with_plain_from_one_run(cpu_run, tmp_path):
    if not os.environ.get("WIDEDEEP_DATA"):
        pytest.skip("the lecture benchmarks need the lecture file: set WIDEDEEP_DATA")
    run = json.loads(cpu_run.read_text())
    out = build(results_with(tmp_path, ("cpu-quick.json", run)))
    table = read_table(next(p for p in out["tables"]
                           if Path(p).name == "throughput_engines.csv")).set_index("name")
    by_name = {b["name"]: b for b in run["benchmarks"]}
    plain = by_name["test_lecture_plain"]["stats"]["median"] * 1e6
    batched = by_name["test_lecture_batched[64-auto]"]
    per_model = batched["stats"]["median"] * 1e6 / 64
    row = table.loc["test_lecture_batched[64-auto]"]
    assert row["us_per_model_epoch"] == pytest.approx(per_model)
    assert row["speedup_vs_plain"] == pytest.approx(plain / per_model)
    assert table.loc["test_lecture_plain", "speedup_vs_plain"] == pytest.approx(1.0)


def _with_sweeps(run: dict, plain_s: float, auto_s: float) -> dict:
    """``run`` plus two whole-command sweep cases (kind ``sweep``) with the given medians."""
    run = json.loads(json.dumps(run))
    for engine, median in (("plain", plain_s), ("auto", auto_s)):
        case = json.loads(json.dumps(run["benchmarks"][0]))
        case["name"] = f"test_sweep_command[{engine}]"
        case["stats"].update(median=median, min=median)
        case["extra_info"] = {"kind": "sweep", "device": "cpu", "engine": engine, "models": 64}
        run["benchmarks"].append(case)
    return run


def test_sweep_speedup_is_taken_within_each_run(cpu_run, tmp_path):
    run = json.loads(cpu_run.read_text())
    later = _with_sweeps(run, 12.0, 4.0) | {"datetime": "2099-01-01T00:00:00"}
    folder = results_with(tmp_path, ("a.json", _with_sweeps(run, 10.0, 5.0)), ("b.json", later))
    table = sweep_commands(load(folder / "benchmarks")[0]).set_index("engine")
    assert table.loc["auto", "speedup_vs_plain"] == pytest.approx(3.0)  # b.json's own plain
    assert table.loc["plain", "speedup_vs_plain"] == pytest.approx(1.0)
    md = next(Path(p) for p in build(folder)["tables"]
              if Path(p).name == "throughput_engines.md").read_text()
    assert "widedeep sweep" in md and "| auto | 64 | 4 | 3 |" in md


def test_sweep_table_without_the_lecture_cases(cpu_run, tmp_path):
    """Where the lecture benchmarks did not run (no lecture file), the engine tables that do
    not need it are still written."""
    run = _with_sweeps(json.loads(cpu_run.read_text()), 12.0, 4.0)
    run["benchmarks"] = [b for b in run["benchmarks"] if "lecture" not in b["name"]]
    out = build(results_with(tmp_path, ("a.json", run)))
    names = {Path(p).name for p in out["tables"]}
    assert "throughput_engines.md" in names and "throughput_engines.csv" not in names
    md = (tmp_path / "results" / "tables" / "throughput_engines.md").read_text()
    assert "| auto | 64 | 4 | 3 |" in md and "Lecture-size nets" not in md


def test_each_benchmark_is_compared_with_its_own_plain_case(cpu_run, tmp_path):
    run = _with_sweeps(json.loads(cpu_run.read_text()), 12.0, 4.0)
    for engine, median in (("plain", 30.0), ("auto", 15.0)):
        case = json.loads(json.dumps(run["benchmarks"][0]))
        case["name"] = f"test_search_trials[{engine}]"
        case["stats"].update(median=median, min=median)
        case["extra_info"] = {"kind": "runs", "device": "cpu", "engine": engine, "models": 25}
        run["benchmarks"].append(case)
    folder = results_with(tmp_path, ("a.json", run))
    table = sweep_commands(load(folder / "benchmarks")[0]).set_index("name")
    assert table.loc["test_sweep_command[auto]", "speedup_vs_plain"] == pytest.approx(3.0)
    assert table.loc["test_search_trials[auto]", "speedup_vs_plain"] == pytest.approx(2.0)
    assert table.loc["test_search_trials[plain]", "speedup_vs_plain"] == pytest.approx(1.0)


def test_speedup_heatmap_with_cuda_run(cpu_run, tmp_path):
    run = json.loads(cpu_run.read_text())
    out = build(results_with(tmp_path, ("cpu.json", run), ("cuda.json", as_cuda(run, 8.0))))
    figures = {Path(p).name: Path(p) for p in out["figures"]}
    assert_png(figures["throughput_speedup.png"])
    assert not any("No CUDA" in n for n in out["notes"])
    speedup = read_table(next(p for p in out["tables"] if Path(p).name.endswith("speedup.csv")))
    assert speedup["speedup"].to_numpy() == pytest.approx(8.0)
    assert set(zip(speedup["depth"], speedup["width"], strict=True)) == {
        (1, 8), (1, 64), (4, 8), (4, 64)}


def test_no_json_gives_a_note(tmp_path):
    out = build(tmp_path / "results")
    assert out["tables"] == [] and out["figures"] == []
    assert "No benchmark JSON" in out["notes"][0]


def test_cli_writes_into_the_results_folder(cpu_run, tmp_path):
    results = results_with(tmp_path, ("cpu.json", json.loads(cpu_run.read_text())))
    shutil.rmtree(results / "tables", ignore_errors=True)
    from analysis.throughput import main

    assert main([str(results)]) == 0
    assert (results / "tables" / "throughput.csv").is_file()


def test_figures_look_the_same_whoever_draws_them(cpu_run, tmp_path):
    """The report draws these figures after its own; `python -m analysis.throughput` draws
    them in a fresh process. Either way they come out in the report's style: the same
    bytes after matplotlib's defaults as after another seaborn theme."""
    import matplotlib
    import seaborn as sns

    run = json.loads(cpu_run.read_text())
    runs = (("cpu.json", run), ("cuda.json", as_cuda(run, 8.0)))
    drawn = []
    for name, restyle in [("defaults", matplotlib.rcdefaults),
                          ("other-theme", lambda: sns.set_theme(style="dark", context="talk"))]:
        with matplotlib.rc_context():  # the style goes back as it was for later tests
            restyle()
            out = build(results_with(tmp_path / name, *runs))
        drawn.append({Path(p).name: Path(p).read_bytes() for p in out["figures"]})
    assert len(drawn[0]) == 3 and drawn[0] == drawn[1]

"""The report end to end on the tiny profile: every table and figure, read back from records."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tabular import read_table

from widedeep import fused, sweep
from widedeep.cli import main

pytestmark = pytest.mark.slow

TABLES = ["lecture_runs", "grid_final_loss", "grid_best", "grid_stuck_share",
          "grad_ratio_by_depth", "grad_layers_depth2", "init_compare", "confusion_per_class",
          "confusion_per_class_all", "datasets_best", "datasets_all", "leaderboard"]
FIGURES = ["lecture_loss_curve", "lecture_plateau", "grid_test_loss_width8",
           "grid_test_accuracy_width8", "grid_train_loss_width8", "grad_ratio_vs_depth",
           "grad_layers_at_init_width8", "grad_layers_after_training_width8",
           "saturation_width8", "init_grad_layers", "confusion_diabetes_lecture",
           "confusion_diabetes_best", "confusion_diabetes_logreg", "confusion_iris_best",
           "datasets_test_loss", "search_trials"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    """Run ``widedeep report --profile tiny`` once into a temporary folder."""
    folder = os.environ.get("WIDEDEEP_DATA")
    if not folder or not (Path(folder) / "diabetes.csv.gz").exists():
        pytest.skip("the lecture file is not available: set WIDEDEEP_DATA to its folder")
    import widedeep.data

    out = tmp_path_factory.mktemp("report") / "results"
    storage = f"sqlite:///{out.parent / 'records.sqlite3'}"
    with pytest.MonkeyPatch.context() as mp:  # no downloads, not even from a module fixture
        mp.setattr(widedeep.data, "_download", _refuse)
        code = main(["report", "--profile", "tiny", "--out", str(out), "--storage", storage,
                     "--workers", "1", "--quiet"])
    assert code == 0
    return out, storage


def _refuse(url, dest):
    raise OSError("network disabled in tests")


def _table(out: Path, name: str) -> pd.DataFrame:
    return read_table(out / "tables" / f"{name}.csv")


def test_every_table_and_figure_is_written(report):
    out, _ = report
    for name in TABLES:
        assert (out / "tables" / f"{name}.csv").is_file(), name
        assert (out / "tables" / f"{name}.md").read_text().startswith("| "), name
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").is_file(), name


def test_readme_links_resolve_and_name_classes(report):
    out, _ = report
    text = (out / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert len(links) > len(FIGURES)
    for link in links:
        assert not link.startswith("/"), link  # relative, so it renders on GitHub
        assert (out / link).exists(), link
    for n in range(1, 8):
        assert f"## {n}. " in text
    assert "not diabetic" in text


def test_figures_are_valid_images(report):
    from PIL import Image

    out, _ = report
    for path in (out / "figures").glob("*.png"):
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 300 and image.height >= 200, (path.name, image.size)


def test_tables_hold_expected_rows_and_columns(report):
    out, _ = report
    grid = _table(out, "grid_final_loss")
    assert {"activation", "depth", "width", "seeds", "test_loss_mean", "test_loss_std",
            "test_accuracy_mean", "train_loss_mean", "diverged"} <= set(grid.columns)
    assert len(grid) == 2 * 2 * 1  # activations x depths x widths of the tiny profile
    assert set(grid["activation"]) == {"relu", "sigmoid"}
    assert (grid["seeds"] == 2).all()
    lecture = _table(out, "lecture_runs")
    assert list(lecture["seed"]) == [0, 1]
    per_class = _table(out, "confusion_per_class")
    diabetes = per_class[per_class["dataset"] == "diabetes"]
    assert set(diabetes["class"]) == {"diabetic", "not diabetic"}
    assert set(diabetes["model"]) >= {"lecture net (training rows)", "logistic regression"}
    assert len(_table(out, "datasets_best")) == 2
    board = _table(out, "leaderboard")
    assert {"baseline: majority", "baseline: logistic_regression"} <= set(board["model"])
    assert board["model"].str.startswith("net #").sum() >= 1
    layers = _table(out, "grad_layers_depth2")
    assert sorted(layers["layer"].unique()) == [1, 2, 3]  # two hidden layers + output


def test_table_numbers_equal_the_records(report):
    from analysis import grid, lecture
    from analysis.profiles import get_profile

    out, storage = report
    profile = get_profile("tiny")
    rows = pd.DataFrame(sweep.trials(grid.specs(profile)["grid"], storage=storage))
    cell = rows[(rows["activation"] == "relu") & (rows["depth"] == 1) & (rows["width"] == 8)]
    table = _table(out, "grid_final_loss").set_index(["activation", "depth", "width"])
    assert table.loc[("relu", 1, 8), "test_loss_mean"] == pytest.approx(
        np.mean(cell["test_loss"]), abs=1e-6)
    assert table.loc[("relu", 1, 8), "test_accuracy_std"] == pytest.approx(
        np.std(cell["test_accuracy"], ddof=1), abs=1e-6)
    runs = pd.DataFrame(sweep.trials(lecture.specs(profile)["lecture"], storage=storage))
    first = runs[(runs["epochs"] == 100) & (runs["seed"] == 0)].iloc[0]
    assert _table(out, "lecture_runs").loc[0, "train_loss_epoch_100"] == pytest.approx(
        first["final_train_loss"], rel=1e-12)


def test_environment_is_recorded(report):
    out, _ = report
    env = json.loads((out / "environment.json").read_text())
    for key in ("torch_version", "cpu_model", "threads", "cuda_device", "date", "commit",
                "profile", "sweeps", "seconds", "section_seconds"):
        assert key in env, key
    assert env["profile"] == "tiny"
    assert sorted(env["section_seconds"]) == [str(n) for n in range(1, 8)]
    assert all(s["seconds"] >= 0 for s in env["sweeps"])


def test_the_command_that_wrote_the_report_is_recorded(monkeypatch):
    from analysis.report import report_environment

    monkeypatch.setattr(sys, "argv", ["widedeep", "report", "--profile", "tiny", "--quiet"])
    env = report_environment("tiny", "sqlite:///x.sqlite3")
    assert env["command"] == "widedeep report --profile tiny --quiet"
    assert env["fused_lanes"] == fused.lanes()
    monkeypatch.setattr(sys, "argv", ["pytest"])  # not the command line: nothing to record
    assert report_environment("tiny", "sqlite:///x.sqlite3")["command"] is None


def test_the_best_init_names_the_inits_the_seeds_cannot_tell_from_it():
    from analysis.inits import _best_text

    def row(act, init, mean, std):
        return {"activation": act, "init": init, "ratio_at_init": 0.5,
                "test_loss": f"{mean:.3f} ± {std:.3f}", "test_loss_mean": mean,
                "test_loss_std": std}

    table = pd.DataFrame([
        row("tanh", "default", 0.570, 0.086), row("tanh", "lecun", 0.620, 0.022),
        row("tanh", "xavier", 0.962, 0.429), row("tanh", "kaiming", 1.038, 0.099),
        row("sigmoid", "default", 0.6471, 0.0), row("sigmoid", "xavier", 0.6469, 0.0),
        row("relu", "default", 0.40, 0.01), row("relu", "lecun", 0.60, 0.01),
    ])
    lines = dict(line.split(":", 1) for line in _best_text(table).strip().splitlines())
    assert "init=default" in lines["- tanh"] and "lecun (0.620 ± 0.022)" in lines["- tanh"]
    assert "xavier (0.962 ± 0.429)" in lines["- tanh"]  # 0.392 above, its spread 0.429
    assert "kaiming" not in lines["- tanh"]  # 0.468 above: more than 0.099 and 0.086
    assert "init=xavier" in lines["- sigmoid"] and "default (0.647" in lines["- sigmoid"]
    assert "not told apart" not in lines["- relu"]


def test_the_best_dataset_cell_counts_the_cells_the_seeds_cannot_tell_from_it():
    from analysis.datasets import best_row

    agg = pd.DataFrame({
        "activation": ["relu", "tanh", "selu", "gelu"], "depth": [1, 1, 2, 2],
        "test_loss_mean": [0.10, 0.12, 0.30, 0.105], "test_loss_std": [0.03, 0.001, 0.01, None],
        "test_accuracy_mean": [0.9] * 4, "test_accuracy_std": [0.01] * 4})
    logreg = pd.DataFrame({"test_loss": [0.2, 0.22], "test_accuracy": [0.9, 0.91]})
    row = best_row("wine", agg, logreg)
    assert (row["best_activation"], row["best_depth"]) == ("relu", 1)
    assert row["not_told_apart"] == 2  # tanh (0.02 above, within relu's 0.03) and gelu


def test_rerun_trains_nothing(report):
    out, storage = report
    assert main(["report", "--profile", "tiny", "--out", str(out), "--storage", storage,
                 "--workers", "1", "--quiet"]) == 0
    env = json.loads((out / "environment.json").read_text())
    assert env["sweeps"] and all(s["ran_now"] == 0 for s in env["sweeps"])


def test_background_workers_write_the_same_report(report, tmp_path):
    """Two workers run the sections' sweeps in the background: same tables, each trial once."""
    out, _ = report
    out2 = tmp_path / "results"
    assert main(["report", "--profile", "tiny", "--out", str(out2), "--workers", "2",
                 "--quiet"]) == 0
    for name in ("lecture_runs", "grid_final_loss", "grad_ratio_by_depth", "init_compare",
                 "datasets_all"):
        pd.testing.assert_frame_equal(_table(out2, name), _table(out, name), check_exact=True)
    sweeps = json.loads((out2 / "environment.json").read_text())["sweeps"]
    ran = {}
    for s in sweeps:  # the grid is read twice (sections 2 and 3): trained once
        ran[s["name"]] = ran.get(s["name"], 0) + s["ran_now"]
    assert all(ran[s["name"]] == s["total"] for s in sweeps), sweeps


def test_contradictory_profile_is_a_user_error(capsys):
    assert main(["report", "--full", "--profile", "tiny"]) == 2
    assert "error: --full contradicts --profile tiny" in capsys.readouterr().err


def _context(out: Path):
    from analysis.context import Context
    from analysis.profiles import get_profile

    return Context(profile=get_profile("tiny"), out=out, storage="sqlite://", progress=False)


def test_throughput_section_says_how_to_produce_missing_records(tmp_path):
    from analysis import throughput_section

    text = throughput_section.render(_context(tmp_path))
    assert text.startswith("## 7. Throughput")
    assert "pytest bench/" in text


def test_throughput_section_embeds_benchmark_figures_and_machines(tmp_path):
    from analysis import throughput_section

    source = Path(__file__).resolve().parents[1] / "results" / "benchmarks"
    runs = sorted(source.glob("*.json"))
    if not runs:
        pytest.skip("no benchmark JSON committed under results/benchmarks")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / runs[0].name).write_bytes(runs[0].read_bytes())
    text = throughput_section.render(_context(tmp_path))
    machine = json.loads(runs[0].read_text())["machine_info"]
    assert (machine.get("cuda_device") or machine.get("cpu_model")) in text
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (tmp_path / link).is_file(), link


def test_engine_plain_gets_studies_of_its_own(tmp_path):
    """--engine plain: every sweep config and the search train on the plain loop, in studies
    whose names differ from auto's (auto's stay as earlier reports named them)."""
    import dataclasses

    from analysis import grid, leaderboard

    ctx = _context(tmp_path)
    plain = dataclasses.replace(ctx, profile=dataclasses.replace(ctx.profile, engine="plain"))
    auto_spec, plain_spec = grid.specs(ctx.profile)["grid"], grid.specs(plain.profile)["grid"]
    assert auto_spec.name != plain_spec.name and "engine" not in auto_spec.fixed
    point = plain_spec.points()[0]
    assert plain_spec.config(point, 0).engine == "plain"
    assert auto_spec.config(point, 0).engine == "auto"
    assert leaderboard.settings(plain)["engine"] == "plain"
    assert "engine" not in leaderboard.settings(ctx)
    assert leaderboard.study_name(plain) != leaderboard.study_name(ctx)


def test_a_failing_section_stops_the_background_search(tmp_path, monkeypatch, capfd):
    """The search and (with two workers) the sections' sweeps run in processes of their own
    from the start: an error in an earlier section interrupts them quietly (no traceback of
    their own) and leaves no process behind."""
    from analysis import grid, report
    from widedeep.search import SearchJob
    from widedeep.sweep_worker import Background

    if not os.environ.get("WIDEDEEP_DATA"):
        pytest.skip("the lecture file is not available: set WIDEDEEP_DATA to its folder")
    stopped = []

    def spy(real):
        def stop(job):
            out = real(job)
            stopped.append([p.returncode for p in job.procs])
            return out
        return stop

    def boom(ctx):
        raise RuntimeError("section 2 failed")

    monkeypatch.setattr(SearchJob, "stop", spy(SearchJob.stop))
    monkeypatch.setattr(Background, "stop", spy(Background.stop))
    monkeypatch.setattr(grid, "render", boom)
    with pytest.raises(RuntimeError, match="section 2 failed"):
        report.build(profile="tiny", out=tmp_path / "results", progress=False, workers=2)
    assert sorted(len(codes) for codes in stopped) == [1, 2]  # the search's, the sweeps'
    assert not any(None in codes for codes in stopped)  # every process reaped
    assert "Traceback" not in capfd.readouterr().err


def test_a_section_drawn_apart_hands_back_its_text_and_its_errors(tmp_path, monkeypatch):
    """report.Apart: a section drawn in a spawned process returns its Markdown and the
    sweeps it ran, raises what it raised, and is stopped at once when the report stops."""
    import dataclasses
    import time

    import apart_section  # tests/ is on sys.path (pytest's rootdir): the spawned one's too

    from analysis import report
    from widedeep.errors import UserError

    monkeypatch.setattr(report, "ORDER", [(9, apart_section)])
    ctx = _context(tmp_path)
    assert report.Apart(9, ctx).result(ctx) == "## drawn apart\n"
    assert ctx.sweeps == [{"name": "apart", "ran_now": 0}]
    assert int((tmp_path / "drawn_by.txt").read_text()) != os.getpid()
    assert int((tmp_path / "frozen.txt").read_text()) > 1000  # it exits without collecting
    failing = dataclasses.replace(ctx, env={"fail": True})
    drawing = report.Apart(9, failing)
    with pytest.raises(UserError, match="the section failed in its own process"):
        drawing.result(failing)
    assert not drawing.proc.is_alive()
    waiting = report.Apart(9, dataclasses.replace(ctx, env={"wait": True}))
    start = time.monotonic()
    waiting.stop()
    assert not waiting.proc.is_alive() and time.monotonic() - start < 10


def test_the_report_says_when_it_waits_for_the_search(tmp_path, monkeypatch, capsys):
    from analysis import leaderboard, report

    if not os.environ.get("WIDEDEEP_DATA"):
        pytest.skip("the lecture file is not available: set WIDEDEEP_DATA to its folder")
    monkeypatch.setattr(report, "ORDER", [(5, leaderboard)])  # nothing to run beside it
    report.build(profile="tiny", out=tmp_path / "results", progress=True)
    out = capsys.readouterr().out
    assert "up to 3 trials, in the background" in out
    assert "waiting for the search: 0 of 3 trials done" in out
    assert "## 5." in (tmp_path / "results" / "README.md").read_text()


def test_facet_lines_draws_a_panel_per_value_and_one_legend():
    """Five panels in rows of two: a line per hue x style in each, outer labels only."""
    from analysis import plots

    rows = [{"act": a, "depth": d, "width": w, "when": when, "ratio": (i + 1) * d * w}
            for i, a in enumerate("abcde") for d in (1, 2, 4) for w in (6, 64)
            for when in ("init", "trained")]
    fig, axes = plots.facet_lines(pd.DataFrame(rows), x="depth", y="ratio", col="act",
                                  hue="width", style="when", col_wrap=2, xlabel="depth",
                                  ylabel="ratio")
    try:
        assert [ax.get_title() for ax in axes] == list("abcde")
        assert len(fig.axes) == 5  # the sixth slot of the 3 x 2 grid is gone
        assert all(len(ax.get_lines()) == 4 for ax in axes)  # 2 widths x 2 whens
        e = axes[4].get_lines()[0]
        assert list(e.get_xdata()) == [1, 2, 4] and list(e.get_ydata()) == [5 * 6, 10 * 6, 20 * 6]
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == [
            "width = 6", "width = 64", "when = init", "when = trained"]
        assert [ax.get_ylabel() for ax in axes] == ["ratio", "", "ratio", "", "ratio"]
        assert [ax.get_xlabel() for ax in axes] == ["", "", "", "depth", "depth"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def _processes_naming(path: Path) -> list[str]:
    """Pids of the processes whose command line names ``path``."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                out.append(cmdline.parent.name)
        except OSError:  # it ended meanwhile
            pass
    return out


def test_sigterm_stops_the_report_and_its_background_workers(tmp_path):
    """kill (SIGTERM) as Ctrl-C: one line, status 130, no worker left training, every claim
    given back, so that the next run resumes."""
    import signal
    import subprocess
    import sys
    import time

    from analysis import datasets, grid, inits, lecture
    from analysis.profiles import get_profile
    from widedeep.errors import UserError
    from widedeep.sweep_store import Store

    if not os.environ.get("WIDEDEEP_DATA"):
        pytest.skip("the lecture file is not available: set WIDEDEEP_DATA to its folder")
    storage = f"sqlite:///{tmp_path / 'records.sqlite3'}"
    names = {spec.name for section in (lecture, grid, inits, datasets)
             for spec in section.specs(get_profile("tiny")).values()}
    proc = subprocess.Popen([sys.executable, "-m", "widedeep", "report", "--profile", "tiny",
                             "--out", str(tmp_path / "results"), "--storage", storage,
                             "--workers", "2", "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline, store, worker_seen = time.monotonic() + 120, None, None
    try:
        # NOTE: the tiny profile's nets train in milliseconds: the signal goes at the first
        # claim seen running, or once a background worker has lived 3 s (past its imports:
        # the workers stay until the report ends).
        while time.monotonic() < deadline and proc.poll() is None:
            if worker_seen is None and set(_processes_naming(tmp_path)) - {str(proc.pid)}:
                worker_seen = time.monotonic()
            if worker_seen is not None and time.monotonic() - worker_seen > 3.0:
                break
            try:  # opened once it exists: opening takes ~0.5 s
                store = store or Store(storage)
                if any(store.counts(name).get("running") for name in names):
                    break
            except UserError:  # no tables yet
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        if store is not None:
            store.close()
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted"
    assert "Traceback" not in err
    assert _processes_naming(tmp_path) == []  # no worker outlived the report
    with Store(storage) as store:
        assert not any(store.counts(name).get("running") for name in names)  # given back

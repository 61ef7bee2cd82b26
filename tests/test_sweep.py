"""Sweeps: spec validation, exactly-once execution over SQLite and PostgreSQL, crash recovery."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from optuna.trial import TrialState

from widedeep import sweep, sweep_worker
from widedeep.cli import main
from widedeep.errors import UserError
from widedeep.sweep_store import Store

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("seconds", "threads", "study", "trial_number")  # differ between runs by design


def tiny(name="tiny", epochs=4, grid=None, dataset="iris", split="holdout") -> dict:
    """A spec of 2x2 points x 2 seeds; worker processes get diabetes with split none, which
    loads without importing scikit-learn (seconds per process)."""
    return {
        "sweep": {"name": name, "dataset": dataset, "split": split, "seeds": [0, 1]},
        "fixed": {"optimizer": "adam", "lr": 0.01, "epochs": epochs, "width": 8},
        "grid": grid or {"activation": ["relu", "tanh"], "depth": [1, 2]},
    }


def write_toml(path: Path, d: dict) -> Path:
    def value(v):
        return json.dumps(v)  # JSON scalars and lists are valid TOML here

    lines = []
    for table, entries in d.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in entries.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/sweeps.sqlite3"


def stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def assert_exactly_once(spec: sweep.SweepSpec, url: str) -> None:
    """One finished row per point x seed, and one COMPLETE Optuna trial per row."""
    rows = sweep.trials(spec, storage=url)
    keys = {(json.dumps(r["point"], sort_keys=True), r["seed"]) for r in rows}
    total = len(spec.points()) * len(spec.seeds)
    assert len(rows) == len(keys) == total
    with Store(url) as store:
        study = store.study(spec.name)
        done = Counter(t.system_attrs[sweep_worker.KEY_ATTR]
                       for t in study.get_trials(states=(TrialState.COMPLETE,)))
        assert not study.get_trials(states=(TrialState.RUNNING,))
        claims = store.rows(spec.name)
    assert len(done) == total and set(done.values()) == {1}
    assert {c["key"] for c in claims} == set(done)


# ---------------------------------------------------------------------- specs


def test_example_spec_loads():
    spec = sweep.load_spec(ROOT / "sweeps" / "activation-depth.toml")
    assert spec.name == "activation-depth" and spec.seeds == (0, 1, 2)
    assert len(spec.points()) == 18
    assert spec.points()[0] == {"activation": "sigmoid", "depth": 2, "width": 6}


def test_a_fixed_preset_sets_what_sweep_leaves_unset():
    d = tiny()
    d["sweep"].pop("split", None)
    d["fixed"] = {"preset": "lecture"}
    assert sweep.spec_from_dict(d).split == "none"  # the lecture trains and scores all rows
    d["sweep"]["split"] = "cv:3"
    assert sweep.spec_from_dict(d).split == "cv:3"  # [sweep] says otherwise: it wins


@pytest.mark.parametrize("change,words", [
    (lambda d: d["fixed"].update(bogus=1), "unknown option 'bogus'"),
    (lambda d: d["grid"].clear(), "[grid] is empty"),
    (lambda d: d["grid"].update(depth=[]), "depth must be a non-empty list"),
    (lambda d: d["grid"].update(depth=3), "depth must be a non-empty list"),
    (lambda d: d["fixed"].update(lr="fast"), "option lr has the wrong type"),
    (lambda d: d["sweep"].update(dataset="nope"), "unknown dataset 'nope'"),
    (lambda d: d["grid"].update(activation=["relu", "nope"]), "unknown activation 'nope'"),
    (lambda d: d["sweep"].update(seeds=3), "seeds must be a non-empty list"),
    (lambda d: d["sweep"].update(split="cv:1"), "split must be"),
    (lambda d: d["fixed"].update(seed=1), "set it as [sweep] seeds"),
    (lambda d: d["fixed"].update(depth=2), "in both [fixed] and [grid]"),
    (lambda d: d.update(extra={}), "unknown table(s) extra"),
    (lambda d: d["sweep"].pop("name"), "name must be a non-empty string"),
    (lambda d: d["fixed"].update(csv="my.csv"), "dataset and a csv option both name the data"),
])
def test_bad_spec_names_the_problem(change, words):
    d = tiny()
    change(d)
    with pytest.raises(UserError, match=None) as err:
        sweep.spec_from_dict(d)
    assert words in str(err.value)


def test_bad_spec_exits_2_before_any_training(tmp_path, url, capsys):
    d = tiny()
    d["grid"]["depth"] = [1, 0]
    path = write_toml(tmp_path / "bad.toml", d)
    assert main(["sweep", str(path), "--storage", url, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: grid point") and "depth" in err[0]
    assert not (tmp_path / "sweeps.sqlite3").exists()


@pytest.mark.parametrize("argv,words", [
    (["--grace", "0"], "grace must be a number of seconds >= 1, got grace=0.0"),
    (["--grace", "-5"], "grace must be a number of seconds >= 1, got grace=-5.0"),
    (["--grace", "nan"], "grace must be a number of seconds >= 1, got grace=nan"),
    (["--workers", "0"], "workers must be >= 1, got workers=0"),
    (["--storage", "sqlite://"], "in-memory SQLite database"),
    (["--export", "{tmp}"], "--export '{tmp}' is a folder"),
    (["--export", "{tmp}/ok.toml/trials.csv"], "'{tmp}/ok.toml' is a file"),
])
def test_bad_sweep_options_exit_2_before_any_training(tmp_path, url, capsys, argv, words):
    path = write_toml(tmp_path / "ok.toml", tiny())
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["sweep", str(path), "--storage", url, "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert words.format(tmp=tmp_path) in err[0]
    assert not (tmp_path / "sweeps.sqlite3").exists()


# ---------------------------------------------------------------------- running


def lecture_file(name, **kwargs) -> dict:
    return tiny(name, dataset="diabetes", split="none", **kwargs)


@pytest.mark.slow
def test_two_workers_equal_one_worker_and_run_each_trial_once(url, diabetes_dir,
                                                               monkeypatch):
    one = sweep.spec_from_dict(lecture_file("one"))
    two = sweep.spec_from_dict(lecture_file("two"))
    counts = sweep.run_sweep(one, storage=url, progress=False)
    assert counts == {"total": 8, "done": 8, "failed": 0, "diverged": 0, "ran_now": 8}
    assert sweep.run_sweep(two, storage=url, workers=2, progress=False)["ran_now"] == 8
    for spec in (one, two):
        assert_exactly_once(spec, url)
    assert stable(sweep.trials("one", storage=url)) == stable(sweep.trials("two", storage=url))
    spawned, popen = [], subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: spawned.append(a) or popen(*a, **k))
    again = sweep.run_sweep(two, storage=url, workers=2, progress=False)
    assert again["ran_now"] == 0 and again["done"] == 8
    assert spawned == []  # nothing left to claim: no worker started for nothing


@pytest.mark.slow
def test_background_workers_run_several_sweeps_in_order_each_trial_once(url, diabetes_dir):
    specs = [sweep.spec_from_dict(lecture_file(f"bg{i}")) for i in range(3)]
    bg = sweep.start_sweeps(specs, storage=url, workers=2)
    try:
        assert bg.names == {"bg0", "bg1", "bg2"}
        for spec in specs:
            assert bg.wait(spec)
            assert bg.ran(spec.name) == 8
    finally:
        assert bg.stop() == []
    for spec in specs:
        assert_exactly_once(spec, url)
        again = sweep.run_sweep(spec, storage=url, workers=2, progress=False)
        assert again["done"] == 8 and again["ran_now"] == 0
    assert stable(sweep.trials("bg0", storage=url)) == stable(sweep.trials("bg2", storage=url))
    assert sweep.start_sweeps(specs, storage=url, workers=2) is None  # nothing left to run


def test_a_worker_exits_with_its_code_without_collecting_what_it_imported(tmp_path,
                                                                         monkeypatch):
    tests = str(Path(__file__).parent)  # where worker_probe is, for the launched process
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        tests, os.environ.get("PYTHONPATH")])))
    out = tmp_path / "frozen.txt"
    proc = sweep_worker.launch({"out": str(out), "code": 3}, module="worker_probe")
    assert proc.wait(timeout=120) == 3
    assert int(out.read_text()) > 1000  # skip_final_collections() froze them


@pytest.mark.slow
def test_a_sweep_whose_background_workers_died_is_finished_by_run_sweep(url, diabetes_dir):
    spec = sweep.spec_from_dict(lecture_file("died"))
    bg = sweep.start_sweeps([spec], storage=url, workers=2)
    for p in bg.procs:
        p.kill()
    try:
        assert not bg.wait(spec)  # every worker gone: the caller runs the rest
    finally:
        assert bg.stop() == ["0: -9", "1: -9"]
    counts = sweep.run_sweep(spec, storage=url, progress=False, grace_s=1)
    assert counts["done"] == 8 and counts["failed"] == 0
    assert_exactly_once(spec, url)


def test_records_keep_summary_history_and_probes(url):
    spec = sweep.spec_from_dict(tiny("rec", grid={"activation": ["relu"]}))
    sweep.run_sweep(spec, storage=url, progress=False)
    records = sweep.trial_records("rec", storage=url)
    assert [r["seed"] for r in records] == [0, 1]
    for r in records:
        assert r["params"] == {"activation": "relu", "seed": r["seed"]}
        assert r["summary"]["epochs_run"] == 4 and r["summary"]["seed"] == r["seed"]
        assert [h["epoch"] for h in r["history"]] == [1, 2, 3, 4]
        assert {p["epoch"] for p in r["probes"]} >= {0, -1}  # init and final
    row = sweep.trials("rec", storage=url)[0]
    assert row["status"] == "complete" and row["activation"] == "relu" and row["width"] == 8
    assert isinstance(row["test_loss"], float) and isinstance(row["grad_norms_init"], list)


def test_failed_trials_keep_their_reason_and_stop_after_max_attempts(url, monkeypatch):
    real = sweep_worker.run_many

    def flaky(configs):
        if any(c.activation == "tanh" for c in configs):
            raise RuntimeError("boom")
        return real(configs)

    monkeypatch.setattr(sweep_worker, "run_many", flaky)
    spec = sweep.spec_from_dict(tiny("flaky", grid={"activation": ["relu", "tanh"]}))
    counts = sweep.run_sweep(spec, storage=url, progress=False)
    assert (counts["done"], counts["failed"]) == (2, 2)
    failed = [r for r in sweep.trials(spec, storage=url) if r["status"] == "failed"]
    assert all(r["attempts"] == sweep_worker.MAX_ATTEMPTS for r in failed)
    assert all("RuntimeError: boom" in r["reason"] for r in failed)
    assert sweep.run_sweep(spec, storage=url, progress=False)["ran_now"] == 0
    with Store(url) as store:
        fails = store.study("flaky").get_trials(states=(TrialState.FAIL,))
    assert len(fails) == 2 * sweep_worker.MAX_ATTEMPTS
    assert all("boom" in t.user_attrs["reason"] for t in fails)


@pytest.mark.parametrize("where", ["creating trials", "training"])
def test_an_interrupted_attempt_leaves_no_running_trial(url, monkeypatch, where):
    """A Ctrl-C (SIGINT) while a worker creates its trials is held until they exist, then
    raised; one in training is raised at once. Either way the attempt's trials end FAIL
    ("interrupted"), the claims go back to pending, and a second run finishes the sweep."""
    real_start, real_run = sweep_worker._start_trials, sweep_worker.run_many

    def start_then_interrupt(*args):
        started = real_start(*args)
        sweep_worker._INTERRUPTED.set()  # what the SIGINT handler does while deferred
        return started

    def interrupted_run(configs):
        raise KeyboardInterrupt

    if where == "creating trials":
        monkeypatch.setattr(sweep_worker, "_start_trials", start_then_interrupt)
    else:
        monkeypatch.setattr(sweep_worker, "run_many", interrupted_run)
    spec = sweep.spec_from_dict(tiny("int", grid={"activation": ["relu"]}))
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep.run_sweep(spec, storage=url, progress=False)
    finally:
        sweep_worker._INTERRUPTED.clear()
    with Store(url) as store:
        counts = store.counts("int")
        trials = store.study("int").get_trials()
    assert counts == {"pending": 2}
    assert trials and {t.state for t in trials} == {TrialState.FAIL}
    assert {t.user_attrs["reason"] for t in trials} == {"interrupted"}
    monkeypatch.setattr(sweep_worker, "_start_trials", real_start)
    monkeypatch.setattr(sweep_worker, "run_many", real_run)
    assert sweep.run_sweep(spec, storage=url, progress=False)["done"] == 2
    assert_exactly_once(spec, url)


def test_diverged_trials_are_recorded_once(url, monkeypatch):
    real = sweep_worker.run_many

    def diverge(configs):
        results = real(configs)
        for r in results:
            r.summary.update(diverged=True, diverged_reason="training loss nan at epoch 2",
                             test_loss=None)
        return results

    monkeypatch.setattr(sweep_worker, "run_many", diverge)
    spec = sweep.spec_from_dict(tiny("div", grid={"activation": ["relu"]}))
    assert sweep.run_sweep(spec, storage=url, progress=False)["diverged"] == 2
    rows = sweep.trials(spec, storage=url)
    assert {r["status"] for r in rows} == {"diverged"}
    assert rows[0]["reason"] == "training loss nan at epoch 2"
    assert_exactly_once(spec, url)


def test_cli_runs_and_exports_one_tidy_table(tmp_path, url, capsys):
    path = write_toml(tmp_path / "s.toml", tiny("cli", grid={"depth": [1, 2]}))
    out = tmp_path / "out" / "trials.csv"
    argv = ["sweep", str(path), "--storage", url, "--export", str(out), "--quiet"]
    assert main(argv) == 0
    assert "cli: 4/4 trials done (4 run now" in capsys.readouterr().out
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["depth"], r["seed"]) for r in rows] == [("1", "0"), ("1", "1"), ("2", "0"),
                                                       ("2", "1")]
    assert json.loads(rows[0]["point"]) == {"depth": 1} and float(rows[0]["test_loss"]) > 0


# ---------------------------------------------------------------------- crashes and sharing


def _cli(spec_path: Path, url: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "widedeep", "sweep", str(spec_path), "--storage", url,
           "--quiet", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(url: str, name: str, proc, done: int, running: int, timeout: float = 60,
              training: bool = False):
    """Until ``done`` trials are complete and ``running`` rows claimed (with ``training``:
    and a claimed attempt's Optuna trial exists, so that it is training now).

    NOTE: the storage is opened once (opening takes ~0.5 s): a fast net's whole training
    can fit between two polls that each reopened it."""
    deadline = time.monotonic() + timeout
    store = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                store = store or Store(url)
                counts = store.counts(name)
                in_training = not training or bool(store.study(name).get_trials(
                    deepcopy=False, states=(TrialState.RUNNING,)))
            except UserError:  # the worker has not created the tables yet
                counts, in_training = {}, False
            if (counts.get("complete", 0) >= done and counts.get("running", 0) >= running
                    and in_training):
                return
            time.sleep(0.05)
    finally:
        if store is not None:
            store.close()
    pytest.fail(f"worker did not reach {done} done trials: {proc.poll()=}")


@pytest.mark.slow
def test_sigterm_stops_a_sweep_and_its_workers(tmp_path, url, diabetes_dir):
    """kill (SIGTERM) on `widedeep sweep --workers 2`: its workers, in sessions of their own,
    are told to stop; they give their claims back, and a second run finishes the sweep."""
    d = lecture_file("term", epochs=600, grid={"activation": ["relu", "tanh"]})
    d["fixed"].update(depth=8, width=64)
    spec = sweep.spec_from_dict(d)
    proc = _cli(write_toml(tmp_path / "t.toml", d), url, "--workers", "2")
    try:
        _wait_for(url, "term", proc, done=0, running=2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and out.strip().splitlines()[-1] == "error: interrupted"
    with Store(url) as store:
        counts = store.counts("term")
    assert not counts.get("running") and counts.get("pending")  # given back, not lost
    again = sweep.run_sweep(spec, storage=url, progress=False)
    assert again["done"] == 4 and again["failed"] == 0
    assert_exactly_once(spec, url)


@pytest.mark.slow
def test_killed_worker_loses_nothing_and_duplicates_nothing(tmp_path, url, diabetes_dir):
    d = lecture_file("killed", epochs=400, grid={"activation": ["relu", "tanh"]})
    d["fixed"].update(depth=6, width=64)
    spec = sweep.spec_from_dict(d)
    proc = _cli(write_toml(tmp_path / "k.toml", d), url, "--grace", "1")
    try:
        _wait_for(url, "killed", proc, done=2, running=1, training=True)  # one done, one in flight
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate()
    counts = sweep.run_sweep(spec, storage=url, progress=False, grace_s=1)
    assert counts["done"] == 4 and counts["ran_now"] == 2
    assert_exactly_once(spec, url)
    with Store(url) as store:
        lost = store.study("killed").get_trials(states=(TrialState.FAIL,))
        rows = store.rows("killed")
    assert lost and all(t.user_attrs["reason"].startswith("worker lost") for t in lost)
    assert sorted(r["attempts"] for r in rows) == [1, 1, 2, 2]


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_two_worker_processes_share_one_study(tmp_path, diabetes_dir):
    pg = os.environ.get("WIDEDEEP_TEST_POSTGRES_URL")
    if not pg:
        pytest.skip("WIDEDEEP_TEST_POSTGRES_URL is not set (.ci/run starts a server and sets it)")
    name = f"pg-{uuid.uuid4().hex[:12]}"  # the server outlives the test: a fresh study
    d = lecture_file(name, epochs=300)
    spec = sweep.spec_from_dict(d)
    sweep.prepare(spec, pg)  # the tables exist before two workers race for them
    proc = _cli(write_toml(tmp_path / "pg.toml", d), pg)  # as on a second machine
    try:
        _wait_for(pg, name, proc, done=0, running=1)
        here = sweep.run_sweep(spec, storage=pg, progress=False)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 0, out
    there = int(out.split("(")[1].split(" run now")[0])
    assert here["done"] == 8 and here["ran_now"] >= 1 and there >= 1
    assert here["ran_now"] + there == 8
    assert_exactly_once(spec, pg)


@pytest.mark.parametrize("n", [3, 40_000])
def test_blobs_round_trip_inline_and_in_chunks(n):
    import random

    from widedeep.sweep_store import CHUNK_CHARS, blob_attrs, get_blob

    rng = random.Random(0)
    obj = [{"epoch": i, "loss": rng.random()} for i in range(n)]
    attrs = json.loads(json.dumps(blob_attrs("history", obj)))  # as stored: JSON
    assert get_blob(attrs, "history") == obj
    assert all(len(json.dumps(v)) <= CHUNK_CHARS + 100 for v in attrs.values())
    assert (len(attrs) == 1) == (n == 3)


def test_an_interrupt_lost_in_a_weakref_callback_still_stops_a_worker():
    """Python reports an exception raised in a garbage-collector callback as ignored and goes
    on: a worker drops that report and stops at its next check."""
    code = """if True:
        import os, signal, sys, weakref
        from widedeep.sweep_worker import check_interrupted, handle_interrupts
        handle_interrupts()
        class Thing: pass
        thing = Thing()
        def callback(ref):
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(100_000))  # the interrupt lands here, inside the callback
        ref = weakref.ref(thing, callback)
        del thing
        print("went on")
        try:
            check_interrupted()
        except KeyboardInterrupt:
            sys.exit(3)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (3, "went on", "")


def test_an_interrupt_in_deferred_bookkeeping_is_raised_once_it_is_done():
    """Inside ``deferred_interrupts`` a SIGINT is remembered and raised on leaving; inside a
    ``deferred_interrupts(False)`` nested in it (a trial's training), at once."""
    code = """if True:
        import os, signal, sys
        from widedeep.sweep_worker import deferred_interrupts, handle_interrupts
        handle_interrupts()
        steps = []
        try:
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(100_000))
                steps.append("deferred")
                try:
                    with deferred_interrupts(False):
                        os.kill(os.getpid(), signal.SIGINT)
                        sum(range(100_000))
                        steps.append("not raised")
                except KeyboardInterrupt:
                    steps.append("raised in training")
                steps.append("still deferred")
            steps.append("not raised on leaving")
        except KeyboardInterrupt:
            steps.append("raised on leaving")
        print(",".join(steps))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "deferred,raised in training,still deferred,raised on leaving"
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------- writing trials


def _storages(tmp_path) -> list[str]:
    urls = [f"sqlite:///{tmp_path}/trials.sqlite3"]
    if os.environ.get("WIDEDEEP_TEST_POSTGRES_URL"):
        urls.append(os.environ["WIDEDEEP_TEST_POSTGRES_URL"])
    return urls


def _frozen(trial) -> dict:
    return {"number": trial.number, "state": trial.state, "values": trial.values,
            "params": trial.params, "distributions": trial.distributions,
            "user_attrs": trial.user_attrs, "system_attrs": trial.system_attrs,
            "started": trial.datetime_start is not None,
            "completed": trial.datetime_complete is not None}


def test_trials_written_in_one_transaction_read_back_as_optunas_api_writes_them(tmp_path):
    """The direct writer and Optuna's public API, given the same trials, leave studies that
    Optuna reads back equal: numbers (also after trials Optuna made itself), params and
    their distributions, attributes, values (inf too), states; and neither writes to a trial
    that has already ended."""
    import math

    from optuna.distributions import CategoricalDistribution

    from widedeep import sweep_trials

    assert sweep_trials.FAST, "the direct writer should know the installed Optuna's tables"
    dists = {"activation": CategoricalDistribution(["relu", "tanh"]),
             "widths": CategoricalDistribution(["[8, 4]", "[6]"]),
             "seed": CategoricalDistribution([0, 1, 2])}
    new = [sweep_trials.NewTrial({"activation": a, "widths": w, "seed": s}, dists,
                                 user_attrs={"attempt": 1, "worker": f"w{s}"},
                                 system_attrs={"widedeep:key": f"k{a}{s}"})
           for a, w, s in (("tanh", "[6]", 2), ("relu", "[8, 4]", 0), ("relu", "[6]", 1))]
    for url in _storages(tmp_path):
        read = {}
        with Store(url) as store:
            for fast in (True, False):
                name = f"trials-{uuid.uuid4().hex[:8]}-{fast}"
                study = store.study(name, create=True, direction="minimize")
                study.ask()  # a trial made by Optuna first: numbers count it
                sid = store.study_id(name)
                started = sweep_trials.start(store.optuna, sid, new[:2], fast=fast)
                started += sweep_trials.start(store.optuna, sid, new[2:], fast=fast)
                assert [n for _, n in started] == [1, 2, 3]
                ids = [t for t, _ in started]
                ends = [sweep_trials.Ending(ids[0], TrialState.COMPLETE, 0.25,
                                            {"status": "complete", "summary": {"a": [1, 2]}}),
                        sweep_trials.Ending(ids[1], TrialState.COMPLETE, math.inf,
                                            {"status": "diverged"}),
                        sweep_trials.Ending(ids[2], TrialState.FAIL,
                                            user_attrs={"reason": "boom"})]
                assert sweep_trials.end(store.optuna, ends, fast=fast) == [True] * 3
                again = [sweep_trials.Ending(ids[2], TrialState.FAIL,
                                             user_attrs={"reason": "lost"}),
                         sweep_trials.Ending(ids[0], TrialState.COMPLETE, 9.0, {"x": 1})]
                assert sweep_trials.end(store.optuna, again, fast=fast) == [False, False]
                read[fast] = [_frozen(t) for t in store.study(name).get_trials()]
        assert read[True] == read[False], url
        assert read[True][3]["user_attrs"] == {"attempt": 1, "worker": "w1", "reason": "boom"}
        assert read[True][2]["values"] == [math.inf]

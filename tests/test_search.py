"""The exercise 7-1 search: beats the majority class, baselines on the nets' folds, resumable."""

import os
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from widedeep import data, search
from widedeep.baselines import fold_digest
from widedeep.cli import build_parser, main, options_from_args
from widedeep.config import make_config
from widedeep.errors import UserError
from widedeep.sweep_store import Store

pytestmark = pytest.mark.slow  # one small search (about 10 s) shared by the module

BUDGET = dict(dataset="diabetes", split="cv:3", seed=0, trials=3, max_depth=12, max_epochs=15)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One small search, shared by the tests below; records the folds the nets trained on."""
    if not os.environ.get("WIDEDEEP_DATA"):
        pytest.skip("the lecture file is not available: set WIDEDEEP_DATA to its folder")
    url = f"sqlite:///{tmp_path_factory.mktemp('search')}/search.sqlite3"
    used, real = [], data.make_folds

    def spy(y, split, **kwargs):
        folds = real(y, split, **kwargs)
        if split == BUDGET["split"]:
            used.append(fold_digest(folds))
        return folds

    mp = pytest.MonkeyPatch()
    mp.setattr(data, "make_folds", spy)
    try:
        results = search.run_search(study="t", storage=url, **BUDGET)
    finally:
        mp.undo()
    return url, results, used


def test_search_beats_the_majority_class(searched):
    _, r, _ = searched
    majority = next(b for b in r["baselines"] if b["name"] == "majority")
    assert r["n_trials"] == 3 and len(r["leaderboard"]) == 3
    assert r["best"]["test_loss"] < majority["test_loss"] - 0.05
    losses = [e["test_loss"] for e in r["leaderboard"]]
    assert losses == sorted(losses) and r["best"]["test_loss_std"] is not None


def test_baselines_come_from_the_nets_folds(searched):
    _, r, used = searched
    assert {b["name"] for b in r["baselines"]} == {
        "majority", "logistic_regression", "sklearn_mlp", "hist_gradient_boosting"}
    assert len(used) >= 1 + 3 and set(used) == {r["fold_digest"]}  # baselines + 3 nets
    ds = data.load_dataset("diabetes")
    assert r["fold_digest"] == fold_digest(data.make_folds(ds.y, "cv:3", seed=0))


def test_best_command_rebuilds_the_best_config(searched):
    _, r, _ = searched
    argv = r["best"]["command"].split()
    assert argv[:2] == ["widedeep", "train"]
    rebuilt = make_config(**options_from_args(build_parser().parse_args(argv[1:])))
    fixed = {k: BUDGET[k] for k in ("dataset", "split", "seed")}
    assert rebuilt == make_config(**fixed, **r["best"]["options"])
    deep = r["best_deep"]
    assert deep is None or deep["depth"] > 10


def test_resuming_a_finished_search_runs_nothing(searched):
    url, r, _ = searched
    again = search.run_search(study="t", storage=url, **BUDGET)
    assert again["n_trials"] == 3 and again["leaderboard"] == r["leaderboard"]
    with pytest.raises(UserError, match="other settings"):
        search.run_search(study="t", storage=url, **{**BUDGET, "max_epochs": 20})


def test_cli_prints_leaderboard_with_baselines(searched, capsys):
    url, _, _ = searched
    argv = ["search", "--study", "t", "--storage", url, "--split", "cv:3", "--trials", "3",
            "--max-depth", "12", "--max-epochs", "15"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for words in ("CV log-loss", "baselines (same folds):", "majority", "best config:",
                  "widedeep train --dataset diabetes", "best net deeper than 10 layers",
                  "Fold by fold against the best baseline on the same folds"):
        assert words in out


def test_the_best_net_is_paired_with_the_best_baseline_fold_by_fold():
    def baseline(name, losses):
        return {"name": name, "test_loss": sum(losses) / len(losses),
                "folds": [{"test_loss": v} for v in losses]}

    net = {"fold_losses": [0.40, 0.50, 0.30]}
    bases = [baseline("majority", [0.6, 0.6, 0.6]), baseline("logreg", [0.45, 0.45, 0.45])]
    text = search.paired_with_baseline(net, bases)
    assert "logreg (0.450)" in text and "lower on 2 of 3 folds" in text
    assert "by +0.050 on average (per fold -0.050 to +0.150" in text
    # nothing to pair: one fold, a fold without a score, other folds, no baseline
    assert search.paired_with_baseline({"fold_losses": []}, bases) == ""
    assert search.paired_with_baseline({"fold_losses": [0.4, None, 0.3]}, bases) == ""
    assert search.paired_with_baseline({"fold_losses": [0.4, 0.3]}, bases) == ""
    assert search.paired_with_baseline(net, []) == ""


@pytest.mark.parametrize("argv,words", [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--trials", "0"], "trials, workers, max_depth and max_epochs must be >= 1"),
    (["--split", "cv:1"], "split must be"),
    (["--timeout", "-1"], "timeout must be a positive number of seconds"),
    (["--timeout", "0"], "timeout must be a positive number of seconds"),
    (["--timeout", "nan"], "timeout must be a positive number of seconds"),
])
def test_bad_search_options_exit_2(argv, words, tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.sqlite3"
    assert main(["search", "--storage", url, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def test_engine_plain_trains_every_trial_on_the_plain_loop(tmp_path):
    url = f"sqlite:///{tmp_path}/s.sqlite3"
    budget = dict(dataset="iris", split="cv:2", seed=0, trials=2, max_depth=2, max_epochs=10)
    result = search.run_search(study="p", storage=url, engine="plain", **budget)
    with Store(url) as store:
        trials = store.study("p").get_trials()
    assert result["n_trials"] == 2 and result["engine"] == "plain"
    assert {t.user_attrs["summary"]["engine"] for t in trials} == {"plain"}


def _terminal(monkeypatch):
    """Captured stderr taken for a terminal: the progress bar shows there only."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


def test_a_search_shows_its_progress_on_a_terminal(tmp_path, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path}/s.sqlite3"
    budget = dict(dataset="iris", split="cv:2", seed=0, trials=2, max_depth=2, max_epochs=10)
    _terminal(monkeypatch)
    search.run_search(study="shown", storage=url, progress=True, **budget)
    err = capsys.readouterr().err
    assert "shown" in err and "2/2" in err and "best=" in err
    search.run_search(study="shown", storage=url, progress=False, **{**budget, "trials": 3})
    assert capsys.readouterr().err == ""  # a third trial, quietly


def test_a_search_cannot_force_the_batched_engine(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.sqlite3"
    assert main(["search", "--storage", url, "--engine", "batched"]) == 2  # argparse: choices
    with pytest.raises(UserError, match="engine must be 'auto' or 'plain'"):
        search.run_search(storage=url, engine="batched")


def _needs_diabetes():
    if not os.environ.get("WIDEDEEP_DATA"):
        pytest.skip("the lecture file is not available: set WIDEDEEP_DATA to its folder")


def test_a_background_search_runs_while_the_caller_goes_on(tmp_path, capsys, monkeypatch):
    _needs_diabetes()
    url = f"sqlite:///{tmp_path}/bg.sqlite3"
    job = search.run_search(study="bg", storage=url, background=True, **BUDGET)
    assert isinstance(job, search.SearchJob)
    assert all(p.poll() is None for p in job.procs)  # a worker takes seconds just to start
    _terminal(monkeypatch)
    results = job.wait(progress=True, trials=BUDGET["trials"])
    assert results["n_trials"] == BUDGET["trials"]
    assert all(p.returncode == 0 for p in job.procs)
    assert f"{BUDGET['trials']}/{BUDGET['trials']}" in capsys.readouterr().err  # the bar


def _states(url: str, name: str) -> list:
    with Store(url) as store:
        return [t.state for t in store.study(name).trials]


def test_stopping_a_background_search_fails_only_its_trial_in_flight(tmp_path, capfd):
    _needs_diabetes()
    url = f"sqlite:///{tmp_path}/stop.sqlite3"
    job = search.run_search(study="s", storage=url, background=True,
                            **{**BUDGET, "trials": 200})
    deadline = time.monotonic() + 120
    while TrialState.RUNNING not in _states(url, "s"):
        assert time.monotonic() < deadline, "no trial started within 2 minutes"
        time.sleep(0.2)
    job.stop()
    assert [p.returncode for p in job.procs] == [130]
    assert "Traceback" not in capfd.readouterr().err  # the failed trial was expected
    states = _states(url, "s")
    # the trial in flight failed: none when the stop came between two trials (a stop that
    # lands while Optuna creates or ends a trial waits for the next check)
    assert TrialState.RUNNING not in states and states.count(TrialState.FAIL) <= 1
    assert set(states) <= {TrialState.COMPLETE, TrialState.FAIL}
    # and the study goes on from there
    done = states.count(TrialState.COMPLETE)
    again = search.run_search(study="s", storage=url, **{**BUDGET, "trials": done + 1})
    assert again["n_trials"] == done + 1


@pytest.mark.parametrize("use_dropout, want", [(False, 0.0), (True, 0.3)])
def test_the_search_space_has_no_dropout_as_a_choice_of_its_own(use_dropout, want):
    params = dict(arch="mlp", activation="relu", depth=3, width=16, init="default",
                  norm="none", residual=False, use_dropout=use_dropout, dropout=0.3,
                  optimizer="adam", lr=0.01, weight_decay=1e-5, batch_size=32, epochs=20,
                  patience=5)
    options = search.suggest(optuna.trial.FixedTrial(params))
    assert options["dropout"] == want
    make_config(**options)  # a config the trainer takes

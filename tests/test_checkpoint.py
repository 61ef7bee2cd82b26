"""``widedeep train --out``: checkpoints of the plain loop, and resuming an interrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from widedeep.checkpoint import Checkpoint, path_for
from widedeep.cli import main
from widedeep.config import make_config
from widedeep.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]


class StopAfter(Checkpoint):
    """A checkpoint that saves at every epoch end (and after each finished fold) and acts
    as if a signal came during the epoch of its ``stop_at``-th save."""

    def __init__(self, *args, stop_at: int, **kwargs):
        super().__init__(*args, every=0.0, **kwargs)
        self.saves, self.stop_at = 0, stop_at

    def save(self, fold=None, state=None) -> None:
        super().save(fold, state)
        self.saves += 1
        if self.saves == self.stop_at:
            self.pending = True


def _same_run(a, b) -> None:
    assert {k: v for k, v in a.summary.items() if k != "seconds"} == {
        k: v for k, v in b.summary.items() if k != "seconds"}
    assert a.history == b.history
    assert a.probes == b.probes


CONFIGS = {
    "lecture": dict(preset="lecture", epochs=30),
    # dropout draws from the global stream, mini-batches from the order stream, Adam has
    # moments, patience keeps the best weights; three folds: finished folds are restored
    "dropout-minibatch-adam-patience-cv": dict(
        dataset="iris", split="cv:3", widths="8,8", activation="relu", dropout=0.2,
        optimizer="adam", lr=0.01, batch_size=16, epochs=25, patience=5, engine="plain",
        probe_epochs="3,20"),
    "rrelu-momentum": dict(dataset="wine", widths="6", activation="rrelu", momentum=0.9,
                           epochs=20, engine="plain"),
    # on CUDA, dropout draws from the device's own stream
    "cuda-dropout": dict(dataset="wine", widths="16,16", activation="tanh", dropout=0.3,
                         optimizer="adam", lr=0.01, epochs=20, device="cuda"),
}


# saves: the lecture 30; rrelu 20 + 1 for its fold; iris, per fold, its epochs (fewer with
# patience) + 1: 40 stops in a later fold
STOPS = {"lecture": [1, 17], "dropout-minibatch-adam-patience-cv": [1, 12, 40],
         "rrelu-momentum": [9], "cuda-dropout": [9]}


@pytest.mark.parametrize(("name", "stop_at"), [(n, k) for n, ks in STOPS.items() for k in ks])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, name, stop_at):
    if CONFIGS[name].get("device") == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: checked on a GPU machine only")
    config = make_config(**CONFIGS[name])
    whole = run_experiment(config)
    out = tmp_path / "run"
    first = StopAfter(out, config.to_dict(), stop_at=stop_at)
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        run_experiment(config, checkpoint=first)
    assert path_for(out).exists()
    resumed = Checkpoint.start(out, config.to_dict(), resume=True)
    assert resumed.current is not None or resumed.fold_states
    assert resumed.seconds_before > 0  # the summary's seconds count the first session too
    if stop_at == 40:
        assert resumed.fold_states, "the stop was meant for a later fold"
    again = run_experiment(config, checkpoint=resumed)
    _same_run(again, whole)
    assert again.summary["seconds"] > resumed.seconds_before


BATCHED = {
    # patience: models leave the stack at different epochs, so a stop may come after some
    # have; dropout and mini-batches draw from per-model streams
    "cv-dropout-minibatch-adam-patience": (dict(
        dataset="iris", split="cv:5", widths="8,8", activation="relu", dropout=0.2,
        optimizer="adam", lr=0.05, batch_size=16, epochs=40, patience=3,
        probe_epochs="2,10"), [1, 6, 12]),
    "cv-rrelu-momentum": (dict(dataset="wine", split="cv:3", widths="6", activation="rrelu",
                               momentum=0.9, epochs=15), [5]),
    "cv-batchnorm-sgd": (dict(dataset="breast_cancer", split="cv:3", widths="16,16",
                              norm="batch", epochs=12), [4]),
    "cv-layernorm-residual-compiled": (dict(dataset="diabetes", split="cv:4", widths="8,8,8",
                                            norm="layer", residual=True, activation="tanh",
                                            optimizer="adamw", lr=0.01, epochs=12), [7]),
    # full batch on CUDA: the step replays a CUDA graph, captured after the restore
    "cuda-graph-cv": (dict(dataset="breast_cancer", split="cv:3", widths="16,16",
                           optimizer="adam", lr=0.01, epochs=12, device="cuda"), [5]),
}


@pytest.mark.parametrize(("name", "stop_at"), [(n, k) for n, (_, ks) in BATCHED.items()
                                               for k in ks])
def test_a_resumed_batched_run_equals_an_uninterrupted_one(tmp_path, name, stop_at):
    from widedeep.batched_run import plan, run_group

    if BATCHED[name][0].get("device") == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: checked on a GPU machine only")
    config = make_config(**BATCHED[name][0])
    assert plan([config]) == [None]  # the batched engine trains it
    (whole,) = run_group([config])
    out = tmp_path / "run"
    first = StopAfter(out, config.to_dict(), stop_at=stop_at, engine="batched")
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        run_group([config], checkpoint=first)
    resumed = Checkpoint.start(out, config.to_dict(), resume=True, engine="batched")
    assert resumed.current is not None
    if stop_at == 12:  # patience has stopped some folds by then
        assert len(resumed.current[1]["active"]) < 5
    (again,) = run_group([config], checkpoint=resumed)
    _same_run(again, whole)
    assert again.summary["engine"] == "batched"


def test_a_checkpoint_is_saved_every_so_often(tmp_path, monkeypatch):
    config = make_config(preset="lecture", epochs=5)
    monkeypatch.setenv("WIDEDEEP_CHECKPOINT_S", "0")
    ck = Checkpoint.start(tmp_path / "run", config.to_dict(), resume=False)
    run_experiment(config, checkpoint=ck)
    saved = torch.load(ck.path, weights_only=False)
    assert list(saved["fold_states"]) == [0] and saved["current"] is None


def _train(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "lecture", "--epochs", "40", "--quiet",
            "--out", str(tmp_path / "run"), *extra]


def test_resume_refusals_are_one_line_each(tmp_path, capsys, monkeypatch):
    assert main(_train(tmp_path, "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", "--preset", "lecture", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    config = make_config(dataset="iris", split="cv:3", epochs=4)  # the batched engine
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, checkpoint=StopAfter(tmp_path / "cv", config.to_dict(),
                                                    stop_at=2))
    assert main(["train", "--dataset", "iris", "--split", "cv:3", "--epochs", "4", "--out",
                 str(tmp_path / "cv"), "--resume"]) == 2
    assert "made by the plain engine" in capsys.readouterr().err
    path_for(tmp_path / "run").write_bytes(b"not a checkpoint")
    assert main(_train(tmp_path)) == 2  # a checkpoint there: resume it or remove it
    assert "--resume" in capsys.readouterr().err
    assert main(_train(tmp_path, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read checkpoint") and "Traceback" not in err
    monkeypatch.setenv("WIDEDEEP_CHECKPOINT_S", "soon")
    path_for(tmp_path / "run").unlink()
    assert main(_train(tmp_path)) == 2
    assert "WIDEDEEP_CHECKPOINT_S" in capsys.readouterr().err


def test_resume_with_other_options_names_them(tmp_path, capsys):
    config = make_config(preset="lecture", epochs=40)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, checkpoint=StopAfter(tmp_path / "run", config.to_dict(),
                                                    stop_at=3))
    assert main(_train(tmp_path, "--resume", "--lr", "0.2", "--seed", "3")) == 2
    assert "other options (lr, seed)" in capsys.readouterr().err
    assert main(_train(tmp_path, "--resume")) == 0
    assert not path_for(tmp_path / "run").exists()  # the run folder is complete: gone
    assert json.loads((tmp_path / "run" / "report.json").read_text())["epochs_run"] == 40


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_training_saves_and_resume_finishes(tmp_path):
    """The command itself: SIGTERM once a checkpoint exists (training is under way) stops it
    with status 130 and one line naming the checkpoint; --resume then completes the run."""
    env = dict(os.environ, WIDEDEEP_CHECKPOINT_S="0.2")
    cmd = [sys.executable, "-m", "widedeep", *_train(tmp_path)]
    cmd[cmd.index("40")] = "6000"  # some seconds
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    ck = path_for(tmp_path / "run")
    try:
        deadline = time.monotonic() + 120
        while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ck.exists(), "no checkpoint was written"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip().startswith("error: interrupted: epoch ") and "--resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    epoch = torch.load(ck, weights_only=False)["current"][1]["epoch"]
    assert 0 < epoch < 6000 and f"epoch {epoch} of 6000" in err
    assert not (tmp_path / "run").exists()  # no run folder that looks complete
    done = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, 6001))
    assert not ck.exists()

"""The whole ``widedeep sweep`` command on the batched engine against the plain loop.

A sweep of 64 seeds of the lecture preset (8-6-4-1 sigmoid, SGD lr 0.1, 100 full-batch
epochs, trained and scored on all rows, as the preset does), run as a child process from an
empty SQLite storage each round: imports, storage, training and recording all count.
``engine = "plain"`` first, then ``"auto"`` (the default, which batches the 64 seeds); the
auto case's ``extra_info`` holds ``speedup_vs_plain`` from this run. Untimed runs
(``--benchmark-disable``, as in the test suite) sweep 4 seeds, to check the harness only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import fill_engine_run
from widedeep import data
from widedeep.errors import UserError

SEEDS, UNTIMED_SEEDS, ROUNDS = 64, 4, 3
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lecture_file() -> None:
    pytest.importorskip("optuna", reason="the sweep command needs Optuna")
    try:
        data.load_dataset("diabetes")
    except UserError as e:
        pytest.skip(f"the lecture file is not available ({e})")


@pytest.fixture(scope="module")
def plain_s() -> dict[str, float]:
    """Median seconds of the plain-engine command, filled by the plain case (runs first)."""
    return {}


def _spec(folder: Path, engine: str, seeds: int) -> Path:
    path = folder / f"lecture-{engine}.toml"
    path.write_text(f'[sweep]\nname = "lecture-{seeds}-seeds-{engine}"\ndataset = "diabetes"\n'
                    f'split = "none"\nseeds = {list(range(seeds))}\n\n'
                    f'[fixed]\npreset = "lecture"\nengine = "{engine}"\n\n'
                    '[grid]\nactivation = ["sigmoid"]\n')
    return path


def _sweep(spec: Path, storage: Path) -> None:
    cmd = [sys.executable, "-m", "widedeep", "sweep", str(spec), "--quiet",
           "--storage", f"sqlite:///{storage}"]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.quick
@pytest.mark.parametrize("engine", ["plain", "auto"])
def test_sweep_command(benchmark, lecture_file, plain_s, tmp_path, engine):
    seeds = UNTIMED_SEEDS if benchmark.disabled else SEEDS
    spec = _spec(tmp_path, engine, seeds)
    fresh = iter(range(1_000))

    def empty_storage():  # every round starts from nothing, so every round trains 64 nets
        return (spec, tmp_path / f"round-{next(fresh)}.sqlite3"), {}

    benchmark.pedantic(_sweep, setup=empty_storage, rounds=ROUNDS, iterations=1)
    fill_engine_run(benchmark, plain_s, kind="sweep", engine=engine, models=seeds, epochs=100)

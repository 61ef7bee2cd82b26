"""Cross-validated trials like the search's, on the batched engine against the plain loop.

Five configs of the kinds ``widedeep search`` samples — Wide & Deep (crossed features too),
dropout (alpha dropout after SELU), layer norm, mini-batches of 32–128 and full batches,
SGD with momentum, Adam, AdamW, early stopping — each under 5-fold cross-validation on
breast_cancer (bundled with scikit-learn), trained by ``run_many`` as a search trial is:
``engine = "plain"`` first, then ``"auto"``, which trains each config's five folds as one
stack. The auto case's ``extra_info`` holds ``speedup_vs_plain`` from this run. Untimed runs
(``--benchmark-disable``, as in the test suite) train 3 epochs, to check the harness only.
"""

from __future__ import annotations

import pytest

from bench.harness import fill_engine_run
from widedeep.config import make_config
from widedeep.run import run_many

ROUNDS, FOLDS = 3, 5
TRIALS = [
    dict(arch="widedeep", activation="relu", widths=(64, 64), dropout=0.2, optimizer="adam",
         lr=0.003, batch_size=32, epochs=40, patience=8),
    dict(activation="tanh", widths=(32,) * 4, dropout=0.1, optimizer="sgd", lr=0.02,
         momentum=0.9, batch_size=64, epochs=60, patience=10),
    dict(arch="widedeep", cross=True, activation="selu", init="lecun", widths=(16,) * 3,
         dropout=0.3, optimizer="adamw", lr=0.01, weight_decay=0.01, epochs=80, patience=15),
    dict(activation="leakyrelu", widths=(64,) * 8, norm="layer", dropout=0.05,
         optimizer="adam", lr=0.001, batch_size=128, epochs=30, patience=5),
    dict(activation="silu", widths=(128,), dropout=0.4, optimizer="adam", lr=0.01,
         batch_size=32, epochs=50, patience=20),
]


@pytest.fixture(scope="module")
def plain_s() -> dict[str, float]:
    """Median seconds of the plain loop, filled by the plain case (runs first)."""
    return {}


@pytest.mark.quick
@pytest.mark.parametrize("engine", ["plain", "auto"])
def test_search_trials(benchmark, plain_s, engine):
    untimed = benchmark.disabled
    configs = [make_config(dataset="breast_cancer", split=f"cv:{FOLDS}", seed=0, engine=engine,
                           **(t | {"epochs": 3} if untimed else t)) for t in TRIALS]
    results = benchmark.pedantic(run_many, args=(configs,), rounds=1 if untimed else ROUNDS,
                                 iterations=1)
    engines = {r.summary["engine"] for r in results}
    assert engines == {"plain" if engine == "plain" else "batched"}, engines
    fill_engine_run(benchmark, plain_s, kind="runs", engine=engine,
                    models=len(configs) * FOLDS)

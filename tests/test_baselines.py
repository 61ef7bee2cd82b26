"""Baselines: scored with widedeep.metrics, checked against scikit-learn's own metrics."""

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss

from widedeep import data
from widedeep.baselines import BASELINES, evaluate_baselines, fold_digest, make_estimator


@pytest.fixture(scope="module")
def iris():
    ds = data.load_dataset("iris")
    return ds, data.make_folds(ds.y, "cv:3", seed=0)


def test_every_baseline_is_scored_on_every_fold(iris):
    ds, folds = iris
    rows = evaluate_baselines(ds, folds)
    assert [r["name"] for r in rows] == list(BASELINES)
    for r in rows:
        assert len(r["folds"]) == 3 and r["test_auc"] is None  # three classes: no AUC
        assert r["test_loss_std"] is not None and 0 <= r["test_accuracy"] <= 1
    majority = rows[0]
    assert majority["test_loss"] == pytest.approx(math.log(3), abs=1e-3)  # balanced prior
    assert rows[1]["test_accuracy"] > 0.9


def test_logistic_regression_matches_sklearn_metrics(iris):
    ds, folds = iris
    fold = folds[0]
    row = evaluate_baselines(ds, [fold], names=("logistic_regression",))[0]
    X_train, X_test = data.standardize(ds.X[fold.train], ds.X[fold.test])
    probs = LogisticRegression(max_iter=1000).fit(X_train, ds.y[fold.train]).predict_proba(X_test)
    assert row["test_loss"] == pytest.approx(log_loss(ds.y[fold.test], probs), rel=1e-6)
    assert row["test_accuracy"] == accuracy_score(ds.y[fold.test], probs.argmax(1))
    assert row["test_loss_std"] is None  # one fold


def test_fold_digest_tells_folds_apart(iris):
    ds, folds = iris
    assert fold_digest(folds) == fold_digest(data.make_folds(ds.y, "cv:3", seed=0))
    assert fold_digest(folds) != fold_digest(data.make_folds(ds.y, "cv:3", seed=1))


def test_binary_baselines_report_auc():
    ds = data.load_dataset("breast_cancer")
    folds = data.make_folds(ds.y, "cv:2", seed=0)
    rows = evaluate_baselines(ds, folds, names=("majority", "logistic_regression"))
    assert rows[0]["test_auc"] == 0.5 and rows[1]["test_auc"] > 0.95


def test_unknown_baseline_is_refused():
    with pytest.raises(ValueError, match="unknown baseline 'svm'"):
        make_estimator("svm", seed=0)
    assert np.isfinite(evaluate_baselines(*_tiny(), names=("sklearn_mlp",))[0]["test_loss"])


def _tiny():
    """A table the MLP cannot converge on in time: ConvergenceWarning must stay silent."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3)).astype(np.float32)
    y = (rng.random(60) > 0.5).astype(np.int64)
    ds = data.Dataset(name="noise", X=X, y=y, class_names=("a", "b"),
                      feature_names=("x0", "x1", "x2"))
    return ds, data.make_folds(y, "cv:2", seed=0)

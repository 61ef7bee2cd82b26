"""Reference models on the same folds as a search: what a tuned net has to beat.

Majority class (the label prior), logistic regression, scikit-learn's MLPClassifier and
HistGradientBoosting, each fit on every fold's training rows (z-scored with the training
rows' statistics, as the nets are) and scored on its test rows with :mod:`widedeep.metrics`,
so log-loss, accuracy and AUC are computed exactly as for the nets.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch

from widedeep import data, metrics

BASELINES = ("majority", "logistic_regression", "sklearn_mlp", "hist_gradient_boosting")


def make_estimator(name: str, seed: int):
    """A fresh scikit-learn classifier for baseline ``name``."""
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    factories = {
        # "prior": predicts the majority class, with the training prior as probabilities
        "majority": lambda: DummyClassifier(strategy="prior"),
        "logistic_regression": lambda: LogisticRegression(max_iter=1000),
        "sklearn_mlp": lambda: MLPClassifier(hidden_layer_sizes=(64, 64), max_iter=500,
                                             early_stopping=True, random_state=seed),
        "hist_gradient_boosting": lambda: HistGradientBoostingClassifier(random_state=seed),
    }
    if name not in factories:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(factories)}")
    return factories[name]()


def fold_digest(folds: list[data.Fold]) -> str:
    """sha1 over every fold's test row indices: equal digests, equal folds."""
    h = hashlib.sha1()
    for fold in folds:
        h.update(np.asarray(fold.test, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


def _score(estimator, ds: data.Dataset, fold: data.Fold) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    X_train, X_test = data.standardize(ds.X[fold.train], ds.X[fold.test])
    probs = np.zeros((len(fold.test), ds.n_classes))  # (n_test, C); classes_ may be fewer
    # One thread: on small tables OpenMP threads only contend (HistGradientBoosting ran 20x
    # slower with all threads on a busy 2-core machine).
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # unconverged is still a baseline
        estimator.fit(X_train, ds.y[fold.train])
        probs[:, estimator.classes_] = estimator.predict_proba(X_test)
    probs, target = torch.as_tensor(probs), torch.as_tensor(ds.y[fold.test])
    cm = metrics.confusion_matrix(probs.argmax(dim=1), target, ds.n_classes)
    return {"test_loss": metrics.log_loss(probs, target),
            "test_accuracy": metrics.accuracy(probs, target),
            "test_auc": metrics.roc_auc(probs[:, 1], target) if ds.n_classes == 2 else None,
            "confusion_matrix": cm.tolist()}


def _mean_std(per_fold: list[dict]) -> dict:
    out = {}
    for key in ("test_loss", "test_accuracy", "test_auc"):
        values = [f[key] for f in per_fold if f[key] is not None]
        out[key] = float(np.mean(values)) if values else None
        out[f"{key}_std"] = float(np.std(values)) if len(values) > 1 else None
    return out


def evaluate_baselines(ds: data.Dataset, folds: list[data.Fold], *, seed: int = 0,
                       names: tuple[str, ...] = BASELINES) -> list[dict]:
    """One row per baseline: mean and std over ``folds`` of log-loss, accuracy, AUC."""
    rows = []
    for name in names:
        per_fold = [_score(make_estimator(name, seed), ds, fold) for fold in folds]
        rows.append({"name": name, **_mean_std(per_fold), "folds": per_fold})
    return rows


def run_baselines(dataset: str, split: str, *, seed: int = 0) -> dict:
    """Baselines on the folds ``widedeep train --dataset D --split S --seed N`` uses."""
    ds = data.load_dataset(dataset)
    folds = data.make_folds(ds.y, split, seed=seed)
    return {"dataset": dataset, "split": split, "seed": seed, "fold_digest": fold_digest(folds),
            "baselines": evaluate_baselines(ds, folds, seed=seed)}

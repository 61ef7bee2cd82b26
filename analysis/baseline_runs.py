"""Logistic regression on exactly the splits widedeep's runs use, scored by widedeep.metrics.

Same folds (``widedeep.data.make_folds`` with the run's seed), same z-scoring (fit on the
training rows) and the same metric functions as a ``widedeep train`` summary, so its numbers
sit beside the nets' without a protocol difference.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from widedeep import data, metrics


def _fit_predict(X_train, y_train, X_test) -> np.ndarray:
    """Class probabilities (n_test, C) of an L2 logistic regression."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=5000)
    with warnings.catch_warnings():
        # NOTE: lbfgs may stop just short of its tolerance on separable data (wine);
        # the scores are still those of a converged-enough model.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X_train, y_train)
    return model.predict_proba(X_test)


def logistic_run(dataset: str, split: str, seed: int) -> dict:
    """One seed: test metrics pooled like a run summary (confusion matrix summed over folds)."""
    ds = data.load_dataset(dataset)
    per_fold, cms = [], []
    for fold in data.make_folds(ds.y, split, seed=seed):
        X_train, X_test = data.standardize(ds.X[fold.train], ds.X[fold.test])
        probs = torch.as_tensor(_fit_predict(X_train, ds.y[fold.train], X_test))
        target = torch.as_tensor(ds.y[fold.test])
        per_fold.append({"loss": metrics.log_loss(probs, target),
                         "accuracy": metrics.accuracy(probs, target)})
        cms.append(metrics.confusion_matrix(probs.argmax(dim=1), target, ds.n_classes))
    cm = torch.stack(cms).sum(dim=0)
    return {"model": "logistic regression", "dataset": dataset, "split": split, "seed": seed,
            "test_loss": float(np.mean([f["loss"] for f in per_fold])),
            "test_accuracy": float(np.mean([f["accuracy"] for f in per_fold])),
            "class_names": list(ds.class_names), "confusion_matrix": cm.tolist(),
            "confusion_matrix_normalized": metrics.normalize_rows(cm).tolist(),
            **metrics.precision_recall_f1(cm)}


def logistic(dataset: str, split: str, seeds) -> pd.DataFrame:
    """One row per seed (see :func:`logistic_run`)."""
    return pd.DataFrame([logistic_run(dataset, split, s) for s in seeds])

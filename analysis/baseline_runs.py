"""Logistic regression on exactly the splits widedeep's runs use, scored by widedeep.metrics.

Same folds (``widedeep.data.make_folds`` with the run's seed), same z-scoring (fit on the
training rows) and the same metric functions as a ``widedeep train`` summary, so its numbers
sit beside the nets' without a protocol difference.
"""

from __future__ import annotations

import pandas as pd
import torch

from widedeep import data, metrics
from widedeep.baselines import evaluate_baselines


def logistic_run(dataset: str, split: str, seed: int) -> dict:
    """One seed: test metrics pooled like a run summary (confusion matrix summed over folds)."""
    ds = data.load_dataset(dataset)
    folds = data.make_folds(ds.y, split, seed=seed)
    (row,) = evaluate_baselines(ds, folds, seed=seed, names=("logistic_regression",))
    cm = torch.tensor([f["confusion_matrix"] for f in row["folds"]]).sum(dim=0)  # (C, C)
    return {"model": "logistic regression", "dataset": dataset, "split": split, "seed": seed,
            "test_loss": row["test_loss"], "test_accuracy": row["test_accuracy"],
            "class_names": list(ds.class_names), "confusion_matrix": cm.tolist(),
            "confusion_matrix_normalized": metrics.normalize_rows(cm).tolist(),
            **metrics.precision_recall_f1(cm)}


def logistic(dataset: str, split: str, seeds) -> pd.DataFrame:
    """One row per seed (see :func:`logistic_run`)."""
    return pd.DataFrame([logistic_run(dataset, split, s) for s in seeds])

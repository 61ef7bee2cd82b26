"""One training run: load data, split, train each fold, evaluate, summarise.

``run_experiment(config)`` returns a :class:`RunResult` whose ``summary`` is the flat JSON
object ``widedeep train --json`` prints; ``history`` and ``probes`` are flat per-epoch and
per-layer rows. With a cross-validation split the summary's test metrics are means over
folds (``*_std`` beside them) and the confusion matrix sums the folds' test rows.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from widedeep import data, metrics
from widedeep.config import TrainConfig
from widedeep.data import Dataset
from widedeep.env import environment
from widedeep.errors import UserError
from widedeep.model import build_model, layer_sizes, step_flops
from widedeep.probes import ProbeCallback, grad_ratio
from widedeep.train import FitResult, Split, criterion_for, fit, predict_logits

if TYPE_CHECKING:
    from widedeep.checkpoint import Checkpoint

# NOTE: on small nets, intra-op threads save nothing and cost a lot on a busy machine (2-core
# dev VM: a 100-epoch lecture run took 0.10 s on 1 thread; on 2 threads 0.11 s when idle but
# 0.5-2.4 s while other processes ran), so nets under this many FLOPs per step train on one
# thread unless --threads says otherwise.
SMALL_STEP_FLOPS = 2e9
PLATEAU_MARGIN = 0.01  # "left the plateau" = training loss below base-rate loss minus this
VAL_FRACTION = 0.15  # share of the training rows held out for early stopping


@dataclass
class RunResult:
    summary: dict
    history: list[dict]  # {"fold", "epoch", "train_loss", "val_loss"}
    probes: list[dict]  # {"fold", "epoch", "layer", "name", "grad_norm", "act_*", ...}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA device is available "
                        f"(torch {torch.__version__}); use --device cpu")
    return torch.device(name)


def resolve_threads(config: TrainConfig, ds: Dataset, models: int = 1) -> int:
    """config.threads, or 1 when a step of ``models`` such nets is small, else torch's
    current setting."""
    if config.threads is not None:
        return config.threads
    rows = config.batch_size or ds.n_rows
    sizes = layer_sizes(ds.n_features, config.widths, ds.n_classes)
    small = models * step_flops(sizes, rows) < SMALL_STEP_FLOPS
    return 1 if small else torch.get_num_threads()


@contextmanager
def num_threads(n: int):
    """Set torch's intra-op threads for the block, then restore them."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_for(config: TrainConfig) -> Dataset:
    if config.csv is not None:
        return data.load_dataset(csv=config.csv, target=config.target)
    return data.load_dataset(config.dataset)


def epochs_to_leave_plateau(train_loss: list[float], base_rate: float) -> int | None:
    """First epoch (1-based) whose training loss is below ``base_rate - PLATEAU_MARGIN``."""
    for epoch, loss in enumerate(train_loss, start=1):
        if loss < base_rate - PLATEAU_MARGIN:
            return epoch
    return None


def run_experiment(config: TrainConfig, *, dataset: Dataset | None = None,
                   progress: bool = False, checkpoint: Checkpoint | None = None) -> RunResult:
    """Train and evaluate ``config`` on every fold of its split (the plain loop); with
    ``checkpoint``, resume what it saved and save as training goes."""
    start = time.perf_counter()
    device = resolve_device(config.device)
    ds = dataset if dataset is not None else load_for(config)
    folds = data.make_folds(ds.y, config.split, test_size=config.test_size, seed=config.seed)
    with num_threads(resolve_threads(config, ds)):
        fits = []
        for k, fold in enumerate(folds):
            saved = checkpoint.fold_states.get(k) if checkpoint is not None else None
            if saved is not None:
                fits.append(_restore_fold(config, ds, fold, device, saved))
                continue
            fits.append(_fit_fold(config, ds, fold, device, progress, checkpoint, k))
            if checkpoint is not None:
                f = fits[-1]
                checkpoint.finish(k, {"model": f.model.state_dict(), "fit": f.fit,
                                      "prober": f.prober.state_dict()})
        result = assemble(config, ds, folds, fits, device)
    result.summary["seconds"] = time.perf_counter() - start + (
        checkpoint.seconds_before if checkpoint is not None else 0.0)  # earlier sessions too
    return result


def run_many(configs: list[TrainConfig], *, progress: bool = False) -> list[RunResult]:
    """Run several configs (e.g. one grid point's seeds), in order; sweeps go through here.

    Configs that can train together do so on the batched engine (``widedeep.batched_run``);
    each summary says which engine ran it (``engine``) and, for the plain loop, why
    (``engine_reason``).
    """
    from widedeep import batched_run  # NOTE: imported here, as batched_run imports this module

    return batched_run.run_many(configs, progress=progress)


@dataclass
class FoldData:
    """One fold's tensors on the device; ``val`` is the early-stopping split, if any."""

    train: Split
    val: Split | None
    test: Split


@dataclass
class FoldFit:
    """A trained fold: its data, model, loss history and probe records."""

    data: FoldData
    model: torch.nn.Module
    fit: FitResult
    prober: ProbeCallback


def fold_data(config: TrainConfig, ds: Dataset, fold: data.Fold, device) -> FoldData:
    """Standardise on the fold's training rows, carve the validation split, move to device."""
    X = ds.X
    if config.standardize:
        X_train, X_test = data.standardize(ds.X[fold.train], ds.X[fold.test])
        X = np.empty_like(ds.X)
        X[fold.train], X[fold.test] = X_train, X_test  # split none: train == test rows

    def tensors(idx: np.ndarray) -> Split:
        return Split(X=torch.as_tensor(X[idx], device=device),
                     y=torch.as_tensor(ds.y[idx], device=device))

    train_idx, val = fold.train, None
    if config.patience:
        inner = data.make_folds(ds.y[fold.train], "holdout", test_size=VAL_FRACTION,
                                seed=config.seed)[0]
        train_idx = fold.train[inner.train]
        val = tensors(fold.train[inner.test])
    return FoldData(train=tensors(train_idx), val=val, test=tensors(fold.test))


def fresh_model(config: TrainConfig, ds: Dataset, device) -> torch.nn.Module:
    """The seeded, initialised model of ``config`` (the same weights on every engine)."""
    torch.manual_seed(config.seed)
    return build_model(config, ds.n_features, ds.n_classes).to(device)


def make_prober(config: TrainConfig, ds: Dataset, train: Split) -> ProbeCallback:
    return ProbeCallback(train.X, train.y, criterion_for(ds.n_classes), config.activation,
                         config.probe_epochs)


def _fit_fold(config, ds: Dataset, fold: data.Fold, device, progress,
              checkpoint: Checkpoint | None = None, k: int = 0) -> FoldFit:
    d = fold_data(config, ds, fold, device)
    model = fresh_model(config, ds, device)
    prober = make_prober(config, ds, d.train)
    result = fit(model, d.train, config, ds.n_classes, val=d.val, callbacks=(prober,),
                 progress=progress, checkpoint=checkpoint, fold=k)
    return FoldFit(data=d, model=model, fit=result, prober=prober)


def _restore_fold(config, ds: Dataset, fold: data.Fold, device, saved: dict) -> FoldFit:
    """A fold a checkpoint holds as finished: its data again, its trained weights."""
    d = fold_data(config, ds, fold, device)
    model = fresh_model(config, ds, device)
    model.load_state_dict(saved["model"])
    prober = make_prober(config, ds, d.train)
    prober.load_state_dict(saved["prober"])
    return FoldFit(data=d, model=model, fit=saved["fit"], prober=prober)


def assemble(config: TrainConfig, ds: Dataset, folds: list[data.Fold], fits: list[FoldFit],
             device) -> RunResult:
    """Evaluate each trained fold on its test rows and build the run's records."""
    per_fold, history, probes = [], [], []
    for k, f in enumerate(fits):
        report = metrics.classification_report(predict_logits(f.model, f.data.test.X),
                                               f.data.test.y, ds.class_names)
        if f.fit.diverged:  # a NaN model's predictions mean nothing: no test scores
            report |= {"loss": None, "accuracy": None, "auc": None}
        base = metrics.base_rate_loss(f.data.train.y, ds.n_classes)
        per_fold.append(_fold_summary(f.fit, report, base, f.prober))
        val = f.fit.val_loss
        history += [{"fold": k, "epoch": e, "train_loss": loss,
                     "val_loss": val[e - 1] if e <= len(val) else None}
                    for e, loss in enumerate(f.fit.train_loss, start=1)]
        probes += [{"fold": k} | row for row in f.prober.rows]
    summary = _summarise(config, ds, folds, per_fold, device)
    return RunResult(summary=_finite(summary), history=_finite(history), probes=_finite(probes))


def _fold_summary(result: FitResult, report: dict, base: float, prober) -> dict:
    init, final = prober.records[0]["grad_norms"], prober.records[-1]["grad_norms"]
    return {
        "final_train_loss": result.train_loss[-1],
        "base_rate_loss": base,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "epochs_to_leave_plateau": epochs_to_leave_plateau(result.train_loss, base),
        "diverged": result.diverged,
        "diverged_reason": result.diverged_reason,
        "grad_norms_init": init,
        "grad_ratio_init": grad_ratio(init),
        "grad_norms_final": final,
        "grad_ratio_final": grad_ratio(final),
        **{f"test_{k}": v for k, v in report.items()},
    }


_MEANED = ("test_loss", "test_accuracy", "test_auc", "final_train_loss")


def _summarise(config: TrainConfig, ds: Dataset, folds, per_fold: list[dict], device) -> dict:
    first = per_fold[0]
    env = environment(device)
    summary = {
        "dataset": ds.name,
        "split": config.split,
        "n_train": int(len(folds[0].train)),
        "n_test": int(len(folds[0].test)),
        "n_folds": len(folds),
        "evaluated_on": "training rows (split none, as the lecture does)"
        if config.split == "none" else "held-out rows",
        "n_features": ds.n_features,
        "class_names": list(ds.class_names),
        **{k: v for k, v in config.to_dict().items() if k not in ("dataset", "split")},
        "depth": len(config.widths),
        "device": str(device),
        "device_name": env["cuda_device"] if device.type == "cuda" else env["cpu_model"],
        "torch_version": env["torch_version"],
        "threads": env["threads"],
        "engine": "plain",
    }
    for key in _MEANED:
        values = [f[key] for f in per_fold if f[key] is not None]
        summary[key] = float(np.mean(values)) if values else None
        summary[f"{key}_std"] = float(np.std(values)) if len(values) > 1 else None
    cm = np.sum([f["test_confusion_matrix"] for f in per_fold], axis=0)
    summary["confusion_matrix"] = cm.tolist()
    summary["confusion_matrix_normalized"] = _row_normalise(cm)
    for key in ("precision", "recall", "f1", "support"):
        summary[key] = first[f"test_{key}"] if len(per_fold) == 1 else _pooled(cm, key)
    for key in ("base_rate_loss", "grad_norms_init", "grad_ratio_init", "grad_norms_final",
                "grad_ratio_final", "epochs_to_leave_plateau", "epochs_run", "best_epoch"):
        summary[key] = first[key]
    summary["diverged"] = any(f["diverged"] for f in per_fold)
    summary["diverged_reason"] = next((f["diverged_reason"] for f in per_fold
                                       if f["diverged"]), None)
    if len(per_fold) > 1:
        summary["folds"] = [{k: f[k] for k in (*_MEANED, "epochs_run", "diverged")}
                            for f in per_fold]
    return summary


def _row_normalise(cm: np.ndarray) -> list[list[float]]:
    return metrics.normalize_rows(torch.as_tensor(cm)).tolist()


def _pooled(cm: np.ndarray, key: str) -> list[float]:
    return metrics.precision_recall_f1(torch.as_tensor(cm))[key]


def _finite(obj):
    """Replace NaN and infinities (a diverged run) by None so records stay valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj

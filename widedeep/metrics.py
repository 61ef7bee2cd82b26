"""Classification metrics as pure functions on tensors: validate, format, compute.

Each function is checked against scikit-learn in ``tests/test_metrics.py``. Shapes: ``n``
rows, ``C`` classes; targets are integer class indices in 0..C-1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from widedeep.errors import UserError


def _check_target(target: Tensor, n: int, num_classes: int, what: str = "target") -> None:
    """``target`` must be (n,) integers in 0..num_classes-1."""
    if num_classes < 2:
        raise UserError(f"num_classes must be >= 2, got {num_classes!r}")
    if target.ndim != 1 or target.shape[0] != n:
        raise UserError(f"{what} must have shape ({n},), got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex:
        raise UserError(f"{what} must hold integer class indices, got dtype {target.dtype}")
    if n and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise UserError(f"{what} values must be in 0..{num_classes - 1}, got range "
                        f"{int(target.min())}..{int(target.max())}")


def _check_probs(probs: Tensor, target: Tensor) -> None:
    if probs.ndim != 2:
        raise UserError(f"probs must have shape (n, C), got {tuple(probs.shape)}")
    if probs.shape[0] == 0:
        raise UserError(f"metrics need at least one row, got probs of shape {tuple(probs.shape)}")
    _check_target(target, probs.shape[0], probs.shape[1])


def probabilities(logits: Tensor) -> Tensor:
    """Class probabilities (n, C): sigmoid for one binary logit (n,) or (n, 1), else softmax."""
    if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        p = torch.sigmoid(logits.reshape(-1))  # (n,) probability of class 1
        return torch.stack([1 - p, p], dim=1)  # (n, 2)
    if logits.ndim != 2:
        raise UserError(f"logits must have shape (n,), (n, 1) or (n, C), "
                        f"got {tuple(logits.shape)}")
    return torch.softmax(logits, dim=1)


def log_loss(probs: Tensor, target: Tensor, eps: float = 1e-7) -> float:
    """Mean negative log-probability of the true class, probabilities clamped to [eps, 1]."""
    _check_probs(probs, target)
    p_true = probs.gather(1, target.long().unsqueeze(1)).squeeze(1)  # (n,)
    return float(-p_true.double().clamp(eps, 1.0).log().mean())


def accuracy(probs: Tensor, target: Tensor) -> float:
    """Fraction of rows whose most probable class is the true one."""
    _check_probs(probs, target)
    return float((probs.argmax(dim=1) == target).double().mean())


def roc_auc(scores: Tensor, target: Tensor) -> float | None:
    """Binary ROC AUC from ranks (Mann-Whitney U, ties averaged); None if one class only."""
    if scores.ndim != 1:
        raise UserError(f"scores must have shape (n,), got {tuple(scores.shape)}")
    _check_target(target, scores.shape[0], 2)
    n_pos = int(target.sum())
    n_neg = target.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True,
                                      return_counts=True)  # unique values sorted ascending
    last = counts.cumsum(0).double()  # (u,) 1-based rank of each value's last copy
    avg_rank = last - (counts.double() - 1) / 2  # (u,) mean rank over tied copies
    rank_sum = avg_rank[inverse][target == 1].sum()
    u = float(rank_sum) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(C, C) int64 counts; rows are true classes, columns predicted ones."""
    if target.ndim != 1 or pred.shape != target.shape:
        raise UserError(f"pred and target must both have shape (n,), got "
                        f"{tuple(pred.shape)} and {tuple(target.shape)}")
    _check_target(target, target.shape[0], num_classes)
    _check_target(pred, pred.shape[0], num_classes, what="pred")
    flat = target.long() * num_classes + pred.long()  # (n,) index into the flattened matrix
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def normalize_rows(cm: Tensor) -> Tensor:
    """Each row divided by its sum (float64); all-zero rows stay zero."""
    cm = cm.double()
    totals = cm.sum(dim=1, keepdim=True)  # (C, 1)
    return torch.where(totals > 0, cm / totals.clamp(min=1e-300), torch.zeros_like(cm))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 where den is 0 (sklearn's zero_division=0)."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def precision_recall_f1(cm: Tensor) -> dict[str, list[float]]:
    """Per-class precision, recall, F1 and support (int) from a (C, C) confusion matrix."""
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise UserError(f"confusion matrix must be square (C, C), got {tuple(cm.shape)}")
    cm = cm.double()
    tp = cm.diagonal()  # (C,)
    predicted = cm.sum(dim=0)  # (C,) column sums: tp + fp
    support = cm.sum(dim=1)  # (C,) row sums: tp + fn
    return {
        "precision": _safe_div(tp, predicted).tolist(),
        "recall": _safe_div(tp, support).tolist(),
        "f1": _safe_div(2 * tp, predicted + support).tolist(),  # 2tp / (2tp + fp + fn)
        "support": [int(s) for s in support.tolist()],
    }


def base_rate_loss(target: Tensor, num_classes: int) -> float:
    """Entropy (nats) of the label prior of ``target``: the loss of always predicting it."""
    if target.ndim != 1 or target.shape[0] == 0:
        raise UserError(f"target must be a non-empty (n,) tensor, got {tuple(target.shape)}")
    _check_target(target, target.shape[0], num_classes)
    prior = torch.bincount(target.long(), minlength=num_classes).double() / target.shape[0]
    present = prior[prior > 0]  # absent classes contribute 0 (p log p -> 0)
    return float(-(present * present.log()).sum())


def classification_report(logits: Tensor, target: Tensor,
                          class_names: Sequence[str]) -> dict:
    """Loss, accuracy, AUC (two classes only), confusion matrices and per-class scores."""
    logits, target = logits.detach().cpu(), target.detach().cpu()
    probs = probabilities(logits)  # (n, C)
    if probs.shape[1] != len(class_names):
        raise UserError(f"logits give {probs.shape[1]} classes but class_names has "
                        f"{len(class_names)}: {list(class_names)!r}")
    cm = confusion_matrix(probs.argmax(dim=1), target, probs.shape[1])
    return {
        "loss": log_loss(probs, target),
        "accuracy": accuracy(probs, target),
        "auc": roc_auc(probs[:, 1], target) if probs.shape[1] == 2 else None,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": normalize_rows(cm).tolist(),
        **precision_recall_f1(cm),
    }

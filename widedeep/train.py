"""The plain training loop. It emits events; callbacks (probes, progress) do the measuring.

Epochs are numbered from 1; event ``on_train_begin`` is "epoch 0", before any update. The
training loss of an epoch is the mean loss over that epoch's batches, each computed before
its update (for full-batch training: the loss the lecture prints).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from widedeep.config import TrainConfig
from widedeep.errors import UserError

if TYPE_CHECKING:
    from widedeep.checkpoint import Checkpoint


@dataclass
class Split:
    """Tensors already on the training device."""

    X: torch.Tensor  # (n, d) float32
    y: torch.Tensor  # (n,) int64


@dataclass
class FitResult:
    train_loss: list[float] = field(default_factory=list)  # per epoch, epoch 1 first
    val_loss: list[float] = field(default_factory=list)  # per epoch, when validating
    best_epoch: int | None = None
    diverged: bool = False
    diverged_reason: str | None = None

    @property
    def epochs_run(self) -> int:
        return len(self.train_loss)


class Callback:
    """Hooks into the loop; override what you need."""

    def on_train_begin(self, model: nn.Module) -> None: ...

    def on_epoch_end(self, model: nn.Module, epoch: int, result: FitResult) -> None: ...

    def on_train_end(self, model: nn.Module, result: FitResult) -> None: ...

    def state_dict(self) -> dict | None:
        """What a checkpoint must keep to resume this callback (see widedeep.checkpoint)."""
        return None

    def load_state_dict(self, state: dict | None) -> None: ...


def criterion_for(n_classes: int):
    """Mean BCE-with-logits on one logit for two classes, cross-entropy otherwise."""
    if n_classes == 2:
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
    return F.cross_entropy


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def check_batches(config: TrainConfig, n: int) -> None:
    """UserError where batch norm would meet a batch of one row (nn.BatchNorm1d fails on
    it in training: one row has no variance): a batch size of 1, or n training rows whose
    last mini-batch holds one."""
    if config.norm != "batch":
        return
    size = n if config.batch_size is None else min(n, config.batch_size)
    if size == 1:
        raise UserError(f"batch norm needs at least 2 rows per batch, got batches of 1 "
                        f"({n} training row(s), batch size {config.batch_size or 'full'})")
    if n % size == 1:
        raise UserError(f"batch norm needs at least 2 rows per batch: {n} training rows in "
                        f"batches of {size} leave a last batch of 1 row; choose another "
                        f"batch size")


def fit(model: nn.Module, train: Split, config: TrainConfig, n_classes: int, *,
        val: Split | None = None, callbacks: tuple[Callback, ...] = (),
        progress: bool = False, checkpoint: Checkpoint | None = None,
        fold: int = 0) -> FitResult:
    """Train ``model`` in place; with ``val`` and ``config.patience``, stop early and keep
    the weights of the epoch with the lowest validation loss. With ``checkpoint``, fold
    ``fold`` resumes from its saved state, if any, and is saved at epoch ends (see
    widedeep.checkpoint)."""
    check_batches(config, train.X.shape[0])
    criterion = criterion_for(n_classes)
    optimizer = make_optimizer(config, model.parameters())
    order = torch.Generator().manual_seed(config.seed)  # mini-batch order, CPU stream
    result, best_state, best_val = FitResult(), None, math.inf
    saved = checkpoint.resume_state(fold) if checkpoint is not None else None
    if saved is None:
        first = 1
        for cb in callbacks:
            cb.on_train_begin(model)
    else:
        first = saved["epoch"] + 1
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        order.set_state(saved["order"])
        _set_rng_state(saved["rng"], train.X.device)
        result, best_state, best_val = saved["result"], saved["best_state"], saved["best_val"]
        for cb, state in zip(callbacks, saved["callbacks"], strict=True):
            cb.load_state_dict(state)
    bar = tqdm(range(first, config.epochs + 1), initial=first - 1, total=config.epochs,
               disable=not progress, file=sys.stderr, delay=1.0, leave=False, unit="epoch",
               desc="train")
    with checkpoint.training() if checkpoint is not None else contextlib.nullcontext(), bar:
        for epoch in bar:
            model.train()
            loss = _epoch(model, train, config.batch_size, criterion, optimizer, order)
            result.train_loss.append(loss)
            if not math.isfinite(loss):
                result.diverged = True
                result.diverged_reason = f"training loss {loss} at epoch {epoch}"
                break
            if val is not None:
                result.val_loss.append(evaluate_loss(model, val, criterion))
                if result.val_loss[-1] < best_val:
                    best_val, result.best_epoch = result.val_loss[-1], epoch
                    best_state = copy.deepcopy(model.state_dict())
            for cb in callbacks:
                cb.on_epoch_end(model, epoch, result)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if (config.patience and result.best_epoch
                    and epoch - result.best_epoch >= config.patience):
                break
            if checkpoint is not None and checkpoint.due():
                checkpoint.save_epoch(fold, epoch, config.epochs, {
                    "epoch": epoch, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "order": order.get_state(),
                    "rng": _rng_state(train.X.device), "result": result,
                    "best_state": best_state, "best_val": best_val,
                    "callbacks": [cb.state_dict() for cb in callbacks]})
    if best_state is not None and config.patience:
        model.load_state_dict(best_state)
    for cb in callbacks:
        cb.on_train_end(model, result)
    return result


def _rng_state(device: torch.device) -> torch.Tensor:
    """The stream dropout and rrelu draw from on ``device``."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _epoch(model, train: Split, batch_size, criterion, optimizer, order) -> float:
    n = train.X.shape[0]
    if batch_size is None or batch_size >= n:
        batches = [None]
    else:
        perm = torch.randperm(n, generator=order).to(train.X.device)
        batches = perm.split(batch_size)
    total = torch.zeros((), device=train.X.device)
    for idx in batches:
        X, y = (train.X, train.y) if idx is None else (train.X[idx], train.y[idx])
        total += train_step(model, X, y, criterion, optimizer) * X.shape[0]
    return float(total / n)  # one host sync per epoch


def train_step(model: nn.Module, X: torch.Tensor, y: torch.Tensor, criterion,
               optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One optimiser step on (X, y); returns the loss before the update, still on the device."""
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(X), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: Split, criterion) -> float:
    model.eval()
    return float(criterion(model(data.X), data.y))


@torch.no_grad()
def predict_logits(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(X)

"""Batched engine, part 2: the training loop for K models at once, with per-model early
stopping, divergence and probes, recorded exactly as the plain loop (``widedeep.train.fit``)
would record each model on its own.

Bookkeeping on the device freezes each model's *final* weights at the epoch the plain loop
would have stopped it (patience, or a non-finite loss), and its *best* weights (lowest
validation loss) while it runs. On the CPU, a model that stops leaves the stack at once, so
the others go on without carrying it. Elsewhere, where a check costs a device sync (and a
CUDA graph fixes the stack), stopped models ride along, frozen in the book; host syncs happen
only every ``SYNC_EVERY`` epochs (to end early once all have stopped) and at the end, when
the histories are cut at each model's stop epoch.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from widedeep import batched, batched_cuda, env
from widedeep.batched import Layout, StackedActivation, StackedOptimizer
from widedeep.batched_grad import ManualStep
from widedeep.config import TrainConfig
from widedeep.fused import FusedStep
from widedeep.model import linear_layers
from widedeep.probes import mean_std
from widedeep.train import FitResult, Split, check_batches

if TYPE_CHECKING:
    from widedeep.checkpoint import Checkpoint

SYNC_EVERY = 16  # epochs between checks whether every model has stopped (off the CPU)
RETIRE = True  # on the CPU, stopped models leave the stack (False: they ride along)


@dataclass
class ProbeRecords:
    """One model's probes, shaped like ``ProbeCallback``: epoch -> {"grad_norms", "rows"}."""

    records: dict[int, dict] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict]:
        return [row for epoch in sorted(self.records) for row in self.records[epoch]["rows"]]


@dataclass
class Data:
    """Training rows of all K models: X (d, n) when shared, else (K, d, n); y (n,) or (K, n)."""

    X: torch.Tensor
    y: torch.Tensor

    @property
    def n(self) -> int:
        return self.X.shape[-1]


def stack_data(splits: list[Split]) -> Data:
    """Feature-major stacked data; one shared copy when every model has the same rows."""
    first = splits[0]
    if all(s.X is first.X or torch.equal(s.X, first.X) for s in splits[1:]) and all(
            torch.equal(s.y, first.y) for s in splits[1:]):
        return Data(X=first.X.t().contiguous(), y=first.y)  # (d, n), (n,)
    return Data(X=torch.stack([s.X.t() for s in splits]),  # (K, d, n)
                y=torch.stack([s.y for s in splits]))  # (K, n)


class Trainer:
    """Holds the stacked state of one group; ``epoch()`` trains all K models for one epoch."""

    def __init__(self, models: list[nn.Module], configs: list[TrainConfig],
                 rngs: list[torch.Tensor] | None = None):
        self.models, self.configs = models, configs
        env.retain_freed_memory()  # no page faults on the step's big temporaries
        self.layout: Layout = batched.layout_of(models[0], configs[0])
        self.act = StackedActivation(configs[0].activation)
        self.flat = batched.stack(models)  # (K, P)
        self.opt = StackedOptimizer(configs, self.flat)
        self.batch_size = configs[0].batch_size
        self.orders = {c.seed: torch.Generator().manual_seed(c.seed) for c in configs}
        self.graph = None  # a captured full-batch step (CUDA only), see batched_cuda
        # rrelu's slopes and dropout's masks: model k draws from its own CPU stream, which
        # starts where the global one stood when the plain loop would have started training
        # it (rngs[k]).
        self.generators = None
        if self.act.spec.name == "rrelu" or self.layout.dropout:
            states = rngs if rngs is not None else [torch.get_rng_state()] * len(models)
            self.generators = [torch.Generator().set_state(s) for s in states]
        # Small nets: one compiled call; else gradients written out in torch ops where the
        # layout allows; else autograd.
        self.manual = (FusedStep.create(self.layout, self.flat.device, len(self.flat), self.act)
                       or ManualStep.create(self.layout, self.act))
        # batch norm's running statistics (its steps are autograd's: neither step above has it)
        self.norms = batched.BatchNorms(models) if self.layout.norm == "batch" else None

    def losses(self, flat: torch.Tensor, data: Data, trace: list | None = None) -> torch.Tensor:
        """(K,) per-model mean loss on ``data``, evaluated (batch norm: running statistics)."""
        with self.norm_mode(False):
            return batched.per_model_loss(batched.forward(self.layout, flat, data.X, self.act,
                                                          trace, self.norms), data.y)

    def norm_mode(self, training: bool | list[bool], update: bool = False):
        """Batch norm's mode inside (see ``batched.BatchNorms.mode``); training by default."""
        return self.norms.mode(training, update) if self.norms is not None else nullcontext()

    def state(self) -> torch.Tensor:
        """(K, P + B): the parameters, then batch norm's running statistics where it has
        them: what the book keeps of the best and the final epoch."""
        return self.flat if self.norms is None else torch.cat([self.flat, self.norms.state], 1)

    def autograd(self, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) losses and (K, P) gradients at the current weights, by autograd: the step
        where no written-out one applies, and what those are tested against."""
        return self.gradients(self.flat, data)

    def gradients(self, flat: torch.Tensor, data: Data, trace: list | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) losses and (K, P) gradients at ``flat`` by autograd (``trace`` as in
        :func:`widedeep.batched.forward`).

        NOTE: each parameter is a leaf of its own, its gradient joined into (K, P) once.
        Through views of one (K, P) leaf, autograd would build a (K, P) gradient per
        parameter and add them up: with 31 layers of 64 and layer norm, 13 ms of a backward
        pass that needs 2 (5 models, 32 rows, dev VM)."""
        leaves = {name: view.detach().requires_grad_(True)
                  for name, view in self.layout.views(flat.detach()).items()}
        loss = batched.per_model_loss(batched.forward(self.layout, leaves, data.X, self.act,
                                                      trace, self.norms), data.y)
        # sum: each model its own gradient
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()), materialize_grads=True)
        return loss.detach(), torch.cat([g.reshape(g.shape[0], -1) for g in grads], 1)

    def step(self, data: Data) -> torch.Tensor:
        """One update of every model on ``data``; returns the (K,) losses before it."""
        # training: rrelu's slopes, dropout's masks, batch norm's batch statistics
        with self.act.drawing(self.generators), self.norm_mode(True, update=True):
            if self.manual is not None:
                loss, grad = self.manual(self.flat, data.X, data.y)
            else:
                loss, grad = self.autograd(data)
        if self.norms is not None:
            self.norms.stepped()
        self.opt.step(self.flat, grad)
        return loss.detach()

    def epoch(self, data: Data) -> torch.Tensor:
        """One epoch; returns (K,) epoch losses (batch losses weighted by batch size)."""
        if self.graph is not None:
            return self.graph()
        if self.batch_size is None or self.batch_size >= data.n:
            return self.step(data)
        # NOTE: the plain loop's order: one generator per seed, randperm(n) each epoch.
        seeds = dict.fromkeys(c.seed for c in self.configs)  # those still training, in order
        perms = {s: torch.randperm(data.n, generator=self.orders[s]) for s in seeds}
        perm = torch.stack([perms[c.seed] for c in self.configs]).to(data.X.device)  # (K, n)
        total = torch.zeros(len(self.configs), device=data.X.device)
        for idx in perm.split(self.batch_size, dim=1):  # (K, b)
            total += self.step(_rows(data, idx)) * idx.shape[1]
        return total / data.n

    def select(self, keep: list[int]) -> None:
        """Go on training only the models at rows ``keep``."""
        idx = torch.tensor(keep, device=self.flat.device)
        self.flat = self.flat[idx]
        self.opt.select(idx)
        if self.norms is not None:
            self.norms.select(idx)
        self.models = [self.models[i] for i in keep]
        self.configs = [self.configs[i] for i in keep]
        if self.generators is not None:
            self.generators = [self.generators[i] for i in keep]

    def state_dict(self) -> dict:
        """What changes as the models train: parameters, optimiser state, random streams,
        batch norm's running statistics (a checkpoint's part; see widedeep.checkpoint)."""
        opt = self.opt
        return {"flat": self.flat, "buf": opt.buf, "sq": opt.sq, "t": opt.t,
                "steps": opt.steps,
                "orders": {seed: g.get_state() for seed, g in self.orders.items()},
                "generators": None if self.generators is None else [
                    g.get_state() for g in self.generators],
                "norms": None if self.norms is None else self.norms.state}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Back to ``state_dict()``'s state, for the same models (after ``select``)."""
        opt = self.opt
        for mine, saved in ((self.flat, state["flat"]), (opt.buf, state["buf"]),
                            (opt.sq, state["sq"]), (opt.t, state["t"])):
            if mine is not None:
                mine.copy_(saved)  # in place: the compiled optimiser step holds them
        opt.steps = state["steps"]
        for seed, g in self.orders.items():
            g.set_state(state["orders"][seed])
        for g, saved in zip(self.generators or [], state["generators"] or [], strict=True):
            g.set_state(saved)
        if self.norms is not None:
            self.norms.state = state["norms"].to(self.flat.device)

    def forks(self, training: list[bool], states: list[torch.Tensor] | None = None,
              ) -> list[torch.Generator | None] | None:
        """The models' random streams (rrelu's slopes, dropout's masks) for a probe, which
        draws from copies (the plain probe forks the global stream): model k draws if
        ``training[k]``, else is evaluated; ``states`` default to where each stream stands
        now. None when the models draw nothing."""
        if self.generators is None:
            return None
        states = states or [g.get_state() for g in self.generators]
        return [torch.Generator().set_state(s) if t else None
                for s, t in zip(states, training, strict=True)]

    def layer_names(self) -> list[str]:
        return [name.removesuffix(".linear") for name, _ in linear_layers(self.models[0])]


def _select(data: Data | None, keep: list[int]) -> Data | None:
    """The rows of models ``keep`` (shared rows stay shared)."""
    if data is None or data.X.dim() == 2:
        return data
    idx = torch.tensor(keep, device=data.X.device)
    return Data(X=data.X[idx], y=data.y[idx])


def _rows(data: Data, idx: torch.Tensor) -> Data:
    """Each model's own rows idx (K, b) of ``data``, as per-model (K, d, b) and (K, b)."""
    if data.X.dim() == 2:
        return Data(X=data.X[:, idx].transpose(0, 1), y=data.y[idx])  # (d, K, b) -> (K, d, b)
    d = data.X.shape[1]
    return Data(X=torch.gather(data.X, 2, idx.unsqueeze(1).expand(-1, d, -1)),
                y=torch.gather(data.y, 1, idx))


class Book:
    """Per-model stopping state, on the device: the plain loop's decisions, made for K."""

    def __init__(self, flat: torch.Tensor, patience: int | None):
        K, device = flat.shape[0], flat.device
        self.patience = patience
        self.stopped = torch.zeros(K, dtype=torch.bool, device=device)
        self.diverged = torch.zeros(K, dtype=torch.bool, device=device)
        self.stop_epoch = torch.zeros(K, dtype=torch.long, device=device)  # 0 = ran to the end
        self.final = flat.clone()  # weights when the plain loop would have stopped
        self.best = flat.clone()
        self.best_val = torch.full((K,), math.inf, device=device)
        self.best_epoch = torch.zeros(K, dtype=torch.long, device=device)  # 0 = none yet

    def update(self, epoch: int, loss: torch.Tensor, val: torch.Tensor | None,
               flat: torch.Tensor) -> None:
        """Record epoch ``epoch`` of the models still running; ``loss``/``val`` are (K,)."""
        finite = torch.isfinite(loss)
        if val is None and not self.patience and (loss.device.type == "cpu"
                                                  and bool(finite.all())):
            return  # nothing to record: no model stops (~10 ops an epoch saved on small nets)
        running = ~self.stopped
        diverging = running & ~finite
        stopping = diverging
        if val is not None:
            better = running & finite & (val < self.best_val)
            self.best_val = torch.where(better, val, self.best_val)
            self.best_epoch = torch.where(better, epoch, self.best_epoch)
            self.best = torch.where(better[:, None], flat, self.best)
        if self.patience:
            waited = (self.best_epoch > 0) & (epoch - self.best_epoch >= self.patience)
            stopping = stopping | (running & finite & waited)
        self.final = torch.where(stopping[:, None], flat, self.final)
        self.stop_epoch = torch.where(stopping, epoch, self.stop_epoch)
        self.diverged |= diverging
        self.stopped |= stopping

    FIELDS = ("stopped", "diverged", "stop_epoch", "final", "best", "best_val", "best_epoch")

    def select(self, keep: list[int]) -> None:
        """Keep the state of the models at rows ``keep`` only."""
        idx = torch.tensor(keep, device=self.stopped.device)
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name)[idx])

    def final_weights(self, flat: torch.Tensor) -> torch.Tensor:
        """(K, P): frozen weights of stopped models, the best ones under early stopping."""
        out = torch.where(self.stopped[:, None], self.final, flat)
        if self.patience:
            out = torch.where((self.best_epoch > 0)[:, None], self.best, out)
        return out


def fit_batched(models: list[nn.Module], trains: list[Split], configs: list[TrainConfig],
                *, vals: list[Split] | None = None, cuda_graphs: bool = True,
                rngs: list[torch.Tensor] | None = None, checkpoint: Checkpoint | None = None,
                stack: int = 0) -> tuple[list[FitResult], list[ProbeRecords]]:
    """Train ``models`` (one group, see ``batched.group_key``) together, in place.

    Model k sees ``trains[k]`` (all with the same number of rows) and ``configs[k]``; returns
    what ``fit`` and a ``ProbeCallback`` would have recorded for each model on its own. On
    CUDA, full-batch steps replay a captured CUDA graph unless ``cuda_graphs`` is False.
    ``rngs[k]`` is the CPU random state the plain loop would start training model k from
    (rrelu's slopes and dropout's masks come from it; default: the current state, for
    every model). With ``checkpoint``, stack ``stack`` resumes from its saved state, if
    any, and is saved at epoch ends (see widedeep.checkpoint).
    """
    K = len(models)
    for config, train in zip(configs, trains, strict=True):
        check_batches(config, train.X.shape[0])
    trainer = Trainer(models, configs, rngs)
    data = stack_data(trains)
    val = stack_data(vals) if vals is not None else None
    book = Book(trainer.state(), configs[0].patience)
    everyone, generators = data, trainer.generators  # for the final probe
    saved = checkpoint.resume_state(stack) if checkpoint is not None else None
    if saved is None:
        first = 1
        active = list(range(K))  # model of each row of the stack
        history, val_history = [], []  # per epoch: ((rows,) losses on the device, active)
        done: dict[int, Retired] = {}
        # The plain loop probes in training mode, but in evaluation mode after a validation
        # pass.
        probes = {0: _by_model(probe_all(trainer, trainer.flat, data, [True] * K), range(K))}
    else:
        first = saved["epoch"] + 1
        active, history, val_history, probes = (saved[k] for k in (
            "active", "history", "val_history", "probes"))
        device = trainer.flat.device
        done = {k: dataclasses.replace(r, weights=r.weights.to(device))
                for k, r in saved["done"].items()}
        if len(active) < K:
            book.select(active), trainer.select(active)
            data, val = _select(data, active), _select(val, active)
        trainer.load_state_dict(saved["trainer"])
        for name, value in saved["book"].items():
            setattr(book, name, value.to(device))
    if cuda_graphs and batched_cuda.can_capture(trainer, data):
        trainer.graph = batched_cuda.capture_step(trainer, data)
    wanted = set(configs[0].probe_epochs)
    # NOTE: on the CPU, where checking costs no device sync, models leave the stack at the
    # epoch they stop (patience or divergence): the others go on without carrying them.
    # Elsewhere they ride along to the end or until all have stopped (checked every
    # SYNC_EVERY epochs), frozen in the book.
    retire = RETIRE and trainer.graph is None and trainer.flat.device.type == "cpu"
    with checkpoint.training() if checkpoint is not None else nullcontext():
        for epoch in range(first, configs[0].epochs + 1):
            loss = trainer.epoch(data)
            history.append((loss, active))
            if val is not None:
                with torch.no_grad():
                    val_history.append((trainer.losses(trainer.flat, val), active))
            book.update(epoch, loss, val_history[-1][0] if val is not None else None,
                        trainer.state())
            if epoch in wanted:
                probes[epoch] = _by_model(probe_all(trainer, trainer.flat, data,
                                                    [val is None] * len(active)), active)
            if retire:
                stopped = book.stopped.tolist()
                if any(stopped):
                    done |= _retire(book, trainer, active,
                                    [i for i, s in enumerate(stopped) if s])
                    keep = [i for i, s in enumerate(stopped) if not s]
                    if not keep:
                        break
                    book.select(keep), trainer.select(keep)
                    data, val = _select(data, keep), _select(val, keep)
                    active = [active[i] for i in keep]
            elif epoch % SYNC_EVERY == 0 and bool(book.stopped.all()):
                break
            if checkpoint is not None and checkpoint.due():
                checkpoint.save_epoch(stack, epoch, configs[0].epochs, {
                    "epoch": epoch, "active": active, "history": history,
                    "val_history": val_history, "probes": probes, "done": done,
                    "trainer": trainer.state_dict(),
                    "book": {name: getattr(book, name) for name in Book.FIELDS}})
    done |= _retire(book, trainer, active, [i for i, k in enumerate(active) if k not in done])
    final = torch.stack([done[k].weights for k in range(K)])
    final, buffers = final[:, :trainer.flat.shape[1]], final[:, trainer.flat.shape[1]:]
    batched.unstack(final, models)
    if trainer.norms is not None:  # the final probe and the models: the final statistics
        trainer.norms.state = buffers
        trainer.norms.write(models)
    states = [done[k].rng for k in range(K)] if generators is not None else None
    probes[-1] = _by_model(probe_all(trainer, final, everyone, [
        val is None or done[k].diverged for k in range(K)], states), range(K))
    return _results(done, history, val_history, probes, trainer.layer_names())


@dataclass
class Retired:
    """What the book knew of a model when it left the stack (or training ended)."""

    weights: torch.Tensor  # (P,) its final weights (the best epoch's under early stopping)
    stop_epoch: int  # 0 = ran to the end
    diverged: bool
    best_epoch: int  # 0 = none
    rng: torch.Tensor | None  # rrelu: its stream's state


def _retire(book: Book, trainer: Trainer, active: list[int], rows) -> dict[int, Retired]:
    weights = book.final_weights(trainer.state())
    stop, diverged = book.stop_epoch.tolist(), book.diverged.tolist()
    best = book.best_epoch.tolist()
    gens = trainer.generators
    return {active[i]: Retired(weights[i].clone(), stop[i], diverged[i], best[i],
                               gens[i].get_state() if gens is not None else None)
            for i in rows}


def _by_model(probe: tuple[list, list], models) -> dict[int, tuple[list, list]]:
    """probe_all's per-row lists, keyed by model."""
    norms, stats = probe
    return {k: (norms[i], stats[i]) for i, k in enumerate(models)}


def probe_all(trainer: Trainer, flat: torch.Tensor, data: Data, training: list[bool],
              states: list[torch.Tensor] | None = None) -> tuple[list, list]:
    """Per-model grad norms (K, layers) and activation stats (K, hidden, 4), on the host.

    The same quantities as ``widedeep.probes.probe``: L2 norm of each Linear weight's
    gradient of the full-batch loss; mean, std, saturated and dead share of each activation.
    Model k is probed in training mode where ``training[k]``, else evaluated (as the plain
    loop's model is after a validation pass); its random streams start at ``states[k]``
    (default: where they stand, see ``Trainer.forks``). Batch norm's running statistics
    are left as they are, as the plain probe leaves them.
    """
    trace: list = []
    generators = trainer.forks(training, states)
    if trainer.generators is None and trainer.manual is not None:
        # Nothing random: the training step's own gradients, and the activations from a
        # forward pass without autograd.
        with torch.no_grad():
            batched.forward(trainer.layout, flat, data.X, trainer.act, trace)
        _, grad = trainer.manual(flat, data.X, data.y)
    else:
        with trainer.act.drawing(generators, probing=True), trainer.norm_mode(training):
            _, grad = trainer.gradients(flat, data, trace)
    norms = torch.stack([grad[:, s].norm(dim=1) for s in trainer.layout.weight_slices()], 1)
    return norms.tolist(), _layer_stats(trainer.act, trace).tolist()  # (K, L), (K, hidden, 4)


def _layer_stats(act: StackedActivation, trace: list) -> torch.Tensor:
    """(K, hidden, 4): mean, std, saturated and dead share of each traced layer's units,
    layers of one shape at once."""
    outs, sats = [a.detach() for _, a, _ in trace], _saturated(act, trace)
    if len({a.shape for a in outs}) == 1:
        groups = [(torch.stack(outs, 1), torch.stack(sats, 1))]  # (K, L, w, n), (K, L, n, w)
    else:
        groups = [(a[:, None], sat[:, None]) for a, sat in zip(outs, sats, strict=True)]
    return torch.cat([torch.stack([*mean_std(a, (2, 3)), sat.float().mean((2, 3)),
                                   sat.all(2).float().mean(2)], 2) for a, sat in groups], 1)


def _saturated(act: StackedActivation, trace: list) -> list[torch.Tensor]:
    """Per traced layer, (K, n, width) bool: which units are saturated. Layers of one shape
    go through the activation's slope at once where it draws nothing and has no parameter
    (32 layers of 64 units: 18 -> 5 ms, dev VM)."""
    zs = [z.detach() for z, _, _ in trace]
    if len(zs) > 1 and act.spec.name not in ("prelu", "rrelu") and len(
            {z.shape for z in zs}) == 1:
        return list(act.saturated(torch.cat(zs)).split(len(zs[0])))
    return [act.saturated(z, None if w is None else w.detach()) for z, (_, _, w) in
            zip(zs, trace, strict=True)]


def _probe_record(norms: list[float], stats: list[list[float]], names: list[str],
                  epoch: int) -> dict:
    keys = ("act_mean", "act_std", "saturated", "dead")
    rows = []
    for i, name in enumerate(names):
        values = stats[i] if i < len(stats) else [None] * 4
        rows.append({"epoch": epoch, "layer": i, "name": name, "grad_norm": norms[i]}
                    | dict(zip(keys, values, strict=True)))
    return {"grad_norms": norms, "rows": rows}


def _results(done: dict[int, Retired], history: list, val_history: list, probes: dict,
             names: list[str]) -> tuple[list[FitResult], list[ProbeRecords]]:
    """Cut each model's record at the epoch the plain loop would have stopped it."""
    train, val = _per_model(history, len(done)), _per_model(val_history, len(done))
    results, records = [], []
    for k in range(len(done)):
        r = done[k]
        run = r.stop_epoch or len(history)
        result = FitResult(train_loss=train[k][:run], best_epoch=r.best_epoch or None)
        if val_history:
            result.val_loss = val[k][:run - 1 if r.diverged else run]  # no val after NaN
        if r.diverged:
            result.diverged = True
            result.diverged_reason = f"training loss {result.train_loss[-1]} at epoch {run}"
        # The plain loop probes epoch e only if the model finished it without diverging.
        kept = [e for e in probes if e <= 0 or e < run or (e == run and not r.diverged)]
        records.append(ProbeRecords({e: _probe_record(*probes[e][k], names, e) for e in kept}))
        results.append(result)
    return results, records


def _per_model(history: list, K: int) -> list[list[float]]:
    """Per-epoch (losses, active models) -> each model's losses, epoch 1 first."""
    out = [[] for _ in range(K)]
    for losses, active in history:
        for k, value in zip(active, losses.tolist(), strict=True):
            out[k].append(value)
    return out

"""Batched engine, part 3: ``run_many`` on the batched engine — plan, train, summarise.

``plan(configs)`` decides per config: the batched engine (``engine`` batched, or auto in a
group of >= 2 models — configs that differ only by seed, init, lr, momentum or weight decay,
times their cross-validation folds) or the plain loop, with the reason. A batched group
trains every (config, fold) pair as one model; pairs are stacked by training-set size, so
cross-validation folds of unequal size simply form two stacks. Summaries, histories and
probes have the plain path's shape (``widedeep.run``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from widedeep import batched, data, run
from widedeep.batched_fit import fit_batched
from widedeep.config import TrainConfig
from widedeep.errors import UserError
from widedeep.train import Split

if TYPE_CHECKING:
    from widedeep.checkpoint import Checkpoint

# Activation bytes of one stack: bounds its memory. NOTE: not a cache size — deep width-64
# nets are compute-bound, and two of them per stack train 17 % faster than one each (dev VM).
CHUNK_BYTES = 64 * 2**20


@dataclass
class Task:
    """One model to train: a config's fold, with its data on the device."""

    config: TrainConfig
    fold: int
    data: run.FoldData
    model: torch.nn.Module
    rng: torch.Tensor  # the CPU random state the plain loop would start training from

    @property
    def train(self) -> Split:
        return self.data.train

    @property
    def val(self) -> Split | None:
        return self.data.val


def plan(configs: list[TrainConfig]) -> list[str | None]:
    """Per config: None to batch it, else why it runs on the plain loop.

    Raises UserError when ``engine="batched"`` is forced on a config the engine can't train.
    """
    sizes = defaultdict(int)  # models per group: configs x folds
    for c in configs:
        if c.engine != "plain" and batched.unsupported_reason(c) is None:
            sizes[batched.group_key(c)] += data.parse_split(c.split)[1]
    reasons = []
    for c in configs:
        reason = batched.unsupported_reason(c)
        if c.engine == "batched" and reason is not None:
            raise UserError(f"engine batched cannot train this config: {reason}; "
                            "use --engine plain or auto")
        if c.engine == "plain":
            reason = "engine plain requested"
        elif reason is None and c.engine == "auto" and sizes[batched.group_key(c)] < 2:
            reason = "no other model to batch with (auto batches >= 2 configs x folds)"
        reasons.append(reason)
    return reasons


def run_many(configs: list[TrainConfig], *, progress: bool = False) -> list[run.RunResult]:
    """Results of ``configs`` in order: planned groups batched, the rest on the plain loop."""
    results: list[run.RunResult | None] = [None] * len(configs)
    groups = defaultdict(list)
    for i, (config, reason) in enumerate(zip(configs, plan(configs), strict=True)):
        if reason is None:
            groups[batched.group_key(config)].append(i)
            continue
        results[i] = run.run_experiment(config, progress=progress)
        results[i].summary.update(engine="plain", engine_reason=reason)
    for members in groups.values():
        for i, result in zip(members, run_group([configs[i] for i in members]), strict=True):
            results[i] = result
    return results


def run_group(configs: list[TrainConfig], *,
              checkpoint: Checkpoint | None = None) -> list[run.RunResult]:
    """Train configs of one group (equal ``batched.group_key``) together; results in order.
    With ``checkpoint``, stacks it holds as finished are not trained again, and the one in
    training resumes where it was saved."""
    start = time.perf_counter()
    config0 = configs[0]
    device = run.resolve_device(config0.device)
    ds = run.load_for(config0)
    folds = {id(c): data.make_folds(ds.y, c.split, test_size=c.test_size, seed=c.seed)
             for c in configs}
    tasks = [_task(c, ds, fold, k, device) for c in configs
             for k, fold in enumerate(folds[id(c)])]
    fitted = {}
    for i, stack in enumerate(_stacks(tasks)):
        finished = checkpoint.fold_states.get(i) if checkpoint is not None else None
        if finished is not None:
            results, probes = finished["results"], finished["probes"]
            for t, weights in zip(stack, finished["weights"], strict=True):
                t.model.load_state_dict(weights)
        else:
            vals = [t.val for t in stack] if config0.patience else None
            with run.num_threads(run.resolve_threads(config0, ds, models=len(stack))):
                results, probes = fit_batched(
                    [t.model for t in stack], [t.train for t in stack],
                    [t.config for t in stack], vals=vals, rngs=[t.rng for t in stack],
                    checkpoint=checkpoint, stack=i)
            if checkpoint is not None:
                checkpoint.finish(i, {"results": results, "probes": probes, "weights": [
                    t.model.state_dict() for t in stack]})
        fitted.update({id(t): (t, r, p) for t, r, p in zip(stack, results, probes, strict=True)})
    by_config = defaultdict(list)
    for t in tasks:
        by_config[id(t.config)].append(fitted[id(t)])
    # NOTE: models of a group train together; each run is charged an equal share of the time.
    seconds = (time.perf_counter() - start + (
        checkpoint.seconds_before if checkpoint is not None else 0.0)) / len(configs)
    with run.num_threads(run.resolve_threads(config0, ds)):  # the summary records threads
        return [_result(c, ds, folds[id(c)], by_config[id(c)], device, seconds)
                for c in configs]


def _task(config: TrainConfig, ds: data.Dataset, fold: data.Fold, k: int, device) -> Task:
    """The rows and model the plain loop would use for this fold (same seeds, same order)."""
    fold_data = run.fold_data(config, ds, fold, device)
    model = run.fresh_model(config, ds, device)
    return Task(config, k, fold_data, model, torch.get_rng_state())


def _stacks(tasks: list[Task]) -> list[list[Task]]:
    """Tasks with equal train (and val) sizes, in chunks of at most ``chunk_size`` models."""
    groups = defaultdict(list)
    for t in tasks:
        groups[(len(t.train.y), len(t.val.y) if t.val is not None else 0)].append(t)
    out = []
    for group in groups.values():
        size = chunk_size(group[0].config, len(group[0].train.y))
        out += [group[i:i + size] for i in range(0, len(group), size)]
    return out


def chunk_size(config: TrainConfig, n: int) -> int:
    """Models per stack: their activations (about 4 tensors per hidden unit) in CHUNK_BYTES."""
    rows = n if config.batch_size is None else min(n, config.batch_size)
    per_model = 4 * 4 * rows * sum(config.widths)  # bytes
    return max(1, CHUNK_BYTES // per_model)


def _result(config: TrainConfig, ds: data.Dataset, folds, fitted: list, device,
            seconds: float) -> run.RunResult:
    """The RunResult ``run.run_experiment`` builds, from the batched fits of its folds."""
    fits = [run.FoldFit(data=task.data, model=task.model, fit=fit_result, prober=prober)
            for task, fit_result, prober in fitted]
    result = run.assemble(config, ds, folds, fits, device)
    result.summary.update(engine="batched", engine_reason=None, seconds=seconds)
    return result

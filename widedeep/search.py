"""``widedeep search``: exercise 7-1, "find a better model", as an Optuna TPE search.

Each trial trains one configuration under stratified cross-validation and reports its mean
held-out log-loss; the study lives in Optuna storage, so a search resumes where it stopped
and several processes (or machines) can share it. Baselines are measured once per study on
the very folds the nets use (same dataset, split and seed). Killed workers' trials are
failed through Optuna's heartbeat and do not block the study.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from tqdm import tqdm

from widedeep.baselines import run_baselines
from widedeep.config import INITS, NORMS, OPTIMIZERS, make_config
from widedeep.errors import UserError
from widedeep.run import run_many
from widedeep.sweep_store import Store
from widedeep.sweep_worker import check_interrupted, deferred_interrupts, handle_interrupts, launch

SETTINGS_ATTR, BASELINES_ATTR = "widedeep:search", "widedeep:baselines"
DEFAULT_STORAGE = "sqlite:///results/search.sqlite3"
ACTIVATIONS = ("relu", "leakyrelu", "elu", "selu", "gelu", "silu", "mish", "tanh",
               "sigmoid", "softplus")
WIDTHS = (8, 16, 32, 64, 128, 256)
BATCH_SIZES = (32, 64, 128, "full")
HEARTBEAT_S, GRACE_S = 10, 60
POLL_S = 1.0  # how often the progress bar of a search in worker processes reads the study


def suggest(trial: optuna.Trial, *, max_depth: int = 32, max_epochs: int = 300) -> dict:
    """Sample one configuration's options (the search space)."""
    options = {
        "arch": trial.suggest_categorical("arch", ["mlp", "widedeep"]),
        "activation": trial.suggest_categorical("activation", list(ACTIVATIONS)),
        "depth": trial.suggest_int("depth", 1, max_depth, log=True),
        "width": trial.suggest_categorical("width", list(WIDTHS)),
        "init": trial.suggest_categorical("init", list(INITS)),
        "norm": trial.suggest_categorical("norm", list(NORMS)),
        "residual": trial.suggest_categorical("residual", [False, True]),
        # none, or a rate: a continuous rate alone would never try exactly none
        "dropout": (trial.suggest_float("dropout", 0.0, 0.5)
                    if trial.suggest_categorical("use_dropout", [False, True]) else 0.0),
        "optimizer": trial.suggest_categorical("optimizer", list(OPTIMIZERS)),
        "lr": trial.suggest_float("lr", 1e-4, 0.3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-7, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
        "epochs": trial.suggest_int("epochs", min(10, max_epochs), max_epochs, log=True),
        "patience": trial.suggest_int("patience", 3, 30, log=True),
    }
    if options["optimizer"] == "sgd":
        options["momentum"] = trial.suggest_float("momentum", 0.0, 0.95)
    return options


def _open_storage(url: str) -> Store:
    with warnings.catch_warnings():  # heartbeats are an experimental Optuna argument
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return Store(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def _objective(settings: dict):
    fixed = {"dataset": settings["dataset"], "split": settings["split"],
             "seed": settings["seed"], "engine": settings.get("engine", "auto")}

    def objective(trial: optuna.Trial) -> float:
        with deferred_interrupts(False):  # stop here: Optuna fails the trial in flight
            check_interrupted()
            return train(trial)

    def train(trial: optuna.Trial) -> float:
        options = suggest(trial, max_depth=settings["max_depth"],
                          max_epochs=settings["max_epochs"])
        summary = run_many([make_config(**fixed, **options)])[0].summary
        trial.set_user_attr("options", options)
        trial.set_user_attr("summary", summary)
        loss = summary.get("test_loss")
        return loss if loss is not None and math.isfinite(loss) else math.inf  # diverged

    return objective


def prepare(study_name: str, url: str, settings: dict) -> None:
    """Create the study (or check its settings) and measure the baselines once."""
    from widedeep.data import list_datasets, parse_split

    if settings["dataset"] not in list_datasets():
        raise UserError(f"unknown dataset {settings['dataset']!r}; known: "
                        f"{', '.join(list_datasets())}")
    parse_split(settings["split"])
    make_config(dataset=settings["dataset"], split=settings["split"], seed=settings["seed"])
    with _open_storage(url) as store:
        study = store.study(study_name, create=True, direction="minimize")
        saved = study.user_attrs.get(SETTINGS_ATTR)
        if saved is not None and saved != settings:
            raise UserError(f"study {study_name!r} in {url} was run with other settings "
                            f"{saved}; use another --study name")
        if saved is None:
            study.set_user_attr(SETTINGS_ATTR, settings)
        if BASELINES_ATTR not in study.user_attrs:
            study.set_user_attr(BASELINES_ATTR, run_baselines(
                settings["dataset"], settings["split"], seed=settings["seed"]))


def work(study_name: str, url: str, *, trials: int, timeout: float | None,
         worker: int = 0, threads: int | None = None,
         on_done: Callable[[optuna.Study], None] | None = None) -> None:
    """Run trials until the study has ``trials`` finished ones (or ``timeout`` passes);
    ``on_done(study)`` after each trial this process ends."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _open_storage(url) as store:
        settings = store.study(study_name).user_attrs[SETTINGS_ATTR]
        sampler = optuna.samplers.TPESampler(seed=settings["seed"] * 1000 + worker)
        study = store.study(study_name, sampler=sampler)
        done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        if done >= trials:
            return
        stop = optuna.study.MaxTrialsCallback(trials)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # NOTE: a Ctrl-C outside a trial's objective (while Optuna creates or ends the
            # trial) waits for the next check: cut there, it would leave the trial RUNNING.
            with deferred_interrupts():
                callbacks = [stop, check_interrupted]
                if on_done is not None:
                    callbacks.append(lambda study, _: on_done(study))
                study.optimize(_objective(settings), n_trials=trials - done, timeout=timeout,
                               callbacks=callbacks, catch=(Exception,))


def run_search(*, study: str | None = None, dataset: str = "diabetes", split: str = "cv:5",
               seed: int = 0, trials: int = 50, timeout: float | None = None,
               storage: str | None = None, workers: int = 1, max_depth: int = 32,
               max_epochs: int = 300, engine: str = "auto",
               background: bool = False, progress: bool = False) -> dict | SearchJob:
    """Run (or resume) a search; returns :func:`search_results`. ``engine``: auto, or plain
    to train every trial on the plain loop (batched cannot be forced: on CUDA, dropout and
    rrelu, in the search space, need the plain loop). ``background``: run
    it in worker processes (one torch thread each) while the caller goes on, and return
    their :class:`SearchJob` as soon as the study and its baselines exist. ``progress``: a
    progress bar of the study's finished trials and best CV log-loss on a terminal."""
    if trials < 1 or workers < 1 or max_depth < 1 or max_epochs < 1:
        raise UserError(f"trials, workers, max_depth and max_epochs must be >= 1, got "
                        f"{trials=}, {workers=}, {max_depth=}, {max_epochs=}")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise UserError(f"timeout must be a positive number of seconds, got {timeout=}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study created
    if storage is None:
        Path("results").mkdir(exist_ok=True)
    url = storage or DEFAULT_STORAGE
    name = study or f"search-{dataset}-{split.replace(':', '')}-seed{seed}"
    if engine not in ("auto", "plain"):
        raise UserError(f"a search's engine must be 'auto' or 'plain', got engine={engine!r}")
    settings = {"dataset": dataset, "split": split, "seed": seed, "max_depth": max_depth,
                "max_epochs": max_epochs}
    if engine != "auto":  # auto stays implicit: earlier studies' settings still match
        settings["engine"] = engine
    prepare(name, url, settings)
    if workers == 1 and not background:
        with _Progress(name, trials, progress) as bar:
            work(name, url, trials=trials, timeout=timeout, on_done=bar.show)
        return search_results(name, url)
    job = SearchJob(name, url, _spawn(name, url, trials=trials, timeout=timeout,
                                      workers=workers))
    return job if background else job.wait(progress=progress, trials=trials)


class _Progress:
    """A search's progress bar (on a terminal only): finished trials of ``trials``, and
    the best CV log-loss so far, from the study."""

    def __init__(self, name: str, trials: int, progress: bool):
        self.bar = tqdm(total=trials, desc=name, unit="trial", file=sys.stderr,
                        disable=not progress or not sys.stderr.isatty())

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def show(self, study: optuna.Study) -> None:
        if self.bar.disable:
            return
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if done:
            self.bar.set_postfix(best=f"{min(t.value for t in done):.4f}", refresh=False)
        self.bar.update(min(len(done), self.bar.total) - self.bar.n)


@dataclass
class SearchJob:
    """Search worker processes running in the background."""

    name: str
    url: str
    procs: list[subprocess.Popen]

    def wait(self, *, progress: bool = False, trials: int = 0) -> dict:
        """Wait for every worker; the search's results (UserError if a worker failed).
        ``progress``: meanwhile, a progress bar of the study's ``trials``."""
        try:
            if progress and sys.stderr.isatty():
                with _open_storage(self.url) as store, _Progress(self.name, trials, True) as bar:
                    study = store.study(self.name)
                    while any(p.poll() is None for p in self.procs):
                        bar.show(study)
                        _wait_any(self.procs, POLL_S)
                    bar.show(study)
            codes = [p.wait() for p in self.procs]
        finally:
            self.stop()
        if any(codes):
            raise UserError(f"search worker(s) exited with status {codes}; see the messages "
                            "above")
        return search_results(self.name, self.url)

    def stop(self) -> None:
        """Interrupt workers still running (each fails its trial in flight) and reap them."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=30)  # they finish their trial's bookkeeping
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait_any(procs: list[subprocess.Popen], seconds: float) -> None:
    """Sleep ``seconds``, or less where a process of ``procs`` exits meanwhile."""
    try:
        next(p for p in procs if p.poll() is None).wait(timeout=seconds)
    except (StopIteration, subprocess.TimeoutExpired):
        pass


def _spawn(name: str, url: str, *, workers: int, **job) -> list[subprocess.Popen]:
    """``workers`` processes of this module, in sessions of their own (see
    :func:`widedeep.sweep_worker.launch`; :meth:`SearchJob.stop` passes a Ctrl-C on once)."""
    return [launch(dict(study_name=name, url=url, worker=i, **job), module=__name__,
                   session=True) for i in range(workers)]


def train_command(options: dict, settings: dict) -> str:
    """The ``widedeep train`` command line that reproduces one trial."""
    args = ["widedeep", "train", "--dataset", settings["dataset"], "--split",
            settings["split"], "--seed", str(settings["seed"])]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return " ".join(args)


def _entry(trial, settings: dict) -> dict:
    s, options = trial.user_attrs["summary"], trial.user_attrs["options"]
    keys = ("test_loss", "test_accuracy", "test_auc")
    return {"number": trial.number, "value": trial.value, "options": options,
            "depth": options["depth"], "diverged": s.get("diverged", False),
            **{k: s.get(k) for k in keys}, **{f"{k}_std": s.get(f"{k}_std") for k in keys},
            "fold_losses": [f["test_loss"] for f in s.get("folds", [])],
            "command": train_command(options, settings)}


def search_results(study_name: str, storage: str, *, top: int = 10) -> dict:
    """Leaderboard (best ``top`` by CV log-loss), best config and command, the best net
    deeper than 10 layers, and the baselines on the same folds."""
    with _open_storage(storage) as store:
        study = store.study(study_name)
        settings = study.user_attrs.get(SETTINGS_ATTR)
        if settings is None:
            raise UserError(f"study {study_name!r} in {storage} is not a widedeep search")
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        baselines = study.user_attrs.get(BASELINES_ATTR, {})
    ranked = [_entry(t, settings) for t in sorted(done, key=lambda t: t.value)]
    deep = [e for e in ranked if e["depth"] > 10]
    return {"study": study_name, "storage": storage, **settings, "n_trials": len(done),
            "leaderboard": ranked[:top], "best": ranked[0] if ranked else None,
            "best_deep": deep[0] if deep else None,
            "baselines": baselines.get("baselines", []),
            "fold_digest": baselines.get("fold_digest")}


def paired_with_baseline(net: dict, baselines: list[dict]) -> str:
    """The net (a ``search_results`` entry) against the best baseline, fold by fold: they
    share the folds, and a spread over folds says little of a difference every fold shows.
    Empty where there is nothing to pair (one fold, no baseline, a fold without a score)."""
    scored = [b for b in baselines if b.get("test_loss") is not None]
    nets = net.get("fold_losses") or []
    if not scored or len(nets) < 2:
        return ""
    base = min(scored, key=lambda b: b["test_loss"])
    bases = [f["test_loss"] for f in base.get("folds", [])]
    if len(bases) != len(nets) or None in bases or None in nets:
        return ""
    diffs = [b - n for n, b in zip(nets, bases, strict=True)]  # > 0: the net's loss is lower
    wins, mean = sum(d > 0 for d in diffs), sum(diffs) / len(diffs)
    return (f"Fold by fold against the best baseline on the same folds, {base['name']} "
            f"({base['test_loss']:.3f}): the net's log-loss is lower on {wins} of "
            f"{len(diffs)} folds, by {mean:+.3f} on average (per fold {min(diffs):+.3f} to "
            f"{max(diffs):+.3f}; positive: the net is better).")


def _quiet() -> None:
    # The trial in flight fails, as it should: no warning and traceback from Optuna for it.
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def _worker_main(argv: list[str]) -> int:
    """Entry point of a worker process (see ``_spawn``)."""
    job = json.loads(argv[0])
    handle_interrupts(before=_quiet)
    try:
        work(job.pop("study_name"), job.pop("url"), **job)
    except KeyboardInterrupt:
        return 130
    return 0


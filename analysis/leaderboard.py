"""Section 5: the exercise-7-1 leaderboard — a small architecture search with baselines.

The search is ``widedeep.search`` (Optuna TPE, cross-validated log-loss, baselines on the
same folds) run into the report's storage; this module lays out its records. A finished
search is marked in its study, so re-rendering the report never starts new trials even if
a timeout ended the search short of its trial count.
"""

from __future__ import annotations

import hashlib
import json

import optuna
import pandas as pd
import seaborn as sns

from analysis import plots
from analysis.context import Context
from analysis.tables import mean_pm_std
from widedeep.search import paired_with_baseline
from widedeep.sweep_store import Store

DONE_ATTR = "widedeep:report-search-done"
OPTION_COLUMNS = ["arch", "activation", "depth", "width", "init", "norm", "residual",
                  "dropout", "optimizer", "lr", "batch_size", "epochs", "patience"]


def settings(ctx: Context) -> dict:
    p = ctx.profile
    out = {"dataset": "diabetes", "split": p.search_split, "seed": 0,
           "trials": p.search_trials, "max_depth": p.search_max_depth,
           "max_epochs": p.search_max_epochs}
    return out | ({"engine": p.engine} if p.engine != "auto" else {})


def study_name(ctx: Context) -> str:
    digest = hashlib.sha1(json.dumps(settings(ctx), sort_keys=True).encode()).hexdigest()[:8]
    return f"report-{ctx.profile.name}-search-{digest}"


def _finished(name: str, storage: str) -> bool:
    with Store(storage) as store:  # closed: its pooled connections too
        try:
            study = optuna.load_study(study_name=name, storage=store.optuna)
        except KeyError:  # no such study yet
            return False
        return bool(study.user_attrs.get(DONE_ATTR))


def start(ctx: Context) -> None:
    """Start the report's search in a background process, unless it already finished.

    NOTE: one worker. With several, TPE's suggestions depend on which trials finished
    first; one seeded worker makes the leaderboard reproducible. Its trials are small, so
    it leaves most of a core to the sweeps that run beside it until section 5 waits for it.
    """
    from widedeep.search import run_search

    name, s = study_name(ctx), settings(ctx)
    if "search" in ctx.cache or "search_job" in ctx.cache or _finished(name, ctx.storage):
        return
    if ctx.progress:
        print(f"  search {name}: up to {s['trials']} trials, in the background", flush=True)
    ctx.cache["search_job"] = run_search(study=name, storage=ctx.storage, workers=1,
                                         timeout=ctx.profile.search_timeout_s,
                                         background=True, **s)


def stop(ctx: Context) -> None:
    """Interrupt a background search still running (its trial in flight fails)."""
    job = ctx.cache.pop("search_job", None)
    if job is not None:
        job.stop()


def search(ctx: Context) -> dict:
    """The report's search results (running or waiting for the search first), cached on the
    context."""
    if "search" in ctx.cache:
        return ctx.cache["search"]
    from widedeep.search import search_results

    name = study_name(ctx)
    if not _finished(name, ctx.storage):
        start(ctx)
        job = ctx.cache.pop("search_job")
        with Store(ctx.storage) as store:
            if ctx.progress and any(p.poll() is None for p in job.procs):
                done = len(store.study(name).get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
                print(f"  waiting for the search: {done} of {settings(ctx)['trials']} trials "
                      "done", flush=True)
            job.wait()
            store.study(name).set_user_attr(DONE_ATTR, True)
    ctx.cache["search"] = search_results(name, ctx.storage, top=10_000)  # every trial
    return ctx.cache["search"]


def best_options(ctx: Context) -> dict:
    """Train options of the search's best trial."""
    return dict(search(ctx)["best"]["options"])


def best_label(ctx: Context) -> str:
    return f"best of the search (trial #{search(ctx)['best']['number']})"


def _scores(e: dict) -> dict:
    return {k: mean_pm_std(e.get(k), e.get(f"{k}_std"))
            for k in ("test_loss", "test_accuracy", "test_auc")}


def leaderboard_table(found: dict, top: int = 10) -> pd.DataFrame:
    """The ``top`` trials and every baseline, ranked by mean CV log-loss."""
    rows = [{"model": f"net #{e['number']}", "loss_mean": e["test_loss"], **_scores(e),
             **{k: e["options"].get(k) for k in OPTION_COLUMNS}}
            for e in found["leaderboard"][:top] if e["test_loss"] is not None]
    rows += [{"model": f"baseline: {b['name']}", "loss_mean": b["test_loss"], **_scores(b)}
             for b in found["baselines"]]
    table = pd.DataFrame(rows).sort_values("loss_mean", kind="stable")
    return table.drop(columns="loss_mean").reset_index(drop=True)


def _figure(ctx: Context, found: dict) -> str:
    trials = pd.DataFrame([{"depth": e["depth"], "test_loss": e["test_loss"],
                            "activation": e["options"]["activation"]}
                           for e in found["leaderboard"] if e["test_loss"] is not None])
    fig, ax = plots.new_figure(8, 4.8)
    sns.scatterplot(data=trials, x="depth", y="test_loss", hue="activation", ax=ax, s=45)
    for b, style in zip(found["baselines"], ["--", ":", "-.", (0, (5, 1))], strict=False):
        ax.axhline(b["test_loss"], color="black", linestyle=style, linewidth=1,
                   label=f"{b['name']} {b['test_loss']:.3f}")
    plots.log2_depth_axis(ax, [2**k for k in range(found["max_depth"].bit_length())])
    ax.set_xlabel("depth (hidden layers, log scale)")
    ax.set_ylabel(f"mean {found['split']} log-loss (nats)")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ctx.figure("search_trials", fig,
                      f"Search on diabetes: {found['n_trials']} trials vs baselines")


def _best_text(found: dict) -> str:
    best, deep = found["best"], found["best_deep"]
    paired = paired_with_baseline(best, found["baselines"])
    text = (f"Best of {found['n_trials']} trials: net #{best['number']}, mean "
            f"{found['split']} log-loss {mean_pm_std(best['test_loss'], best['test_loss_std'])}"
            f", accuracy {mean_pm_std(best['test_accuracy'], best['test_accuracy_std'])}. "
            f"{paired + ' ' if paired else ''}"
            f"To reproduce it:\n\n```bash\n{best['command']}\n```\n\n")
    if deep is None:
        return text + "No trial deeper than 10 layers finished in this budget.\n"
    loss = mean_pm_std(deep["test_loss"], deep["test_loss_std"])
    acc = mean_pm_std(deep["test_accuracy"], deep["test_accuracy_std"])
    return text + (f"Best net deeper than 10 layers: net #{deep['number']}, depth "
                   f"{deep['depth']}, log-loss {loss}, accuracy {acc}"
                   f":\n\n```bash\n{deep['command']}\n```\n")


def render(ctx: Context) -> str:
    """Run the search and write section 5."""
    found = search(ctx)
    return "\n".join([
        "## 5. Exercise 7-1 leaderboard\n",
        f"An Optuna TPE search over architecture and training options (`widedeep search`, "
        f"{found['n_trials']} trials, at most {found['max_epochs']} epochs with early "
        f"stopping, depth 1–{found['max_depth']}) minimising mean log-loss under "
        f"{found['split']} on diabetes (seed {found['seed']}). The baselines are fitted on "
        "the very same folds. The search runs as one seeded worker, so a fresh run on the same "
        "machine finds the same nets — unless a slower machine reaches the search's time "
        "limit before its trial count.\n",
        ctx.table("leaderboard", leaderboard_table(found), "Leaderboard (mean ± std over "
                  "folds), baselines ranked among the nets"),
        _best_text(found),
        _figure(ctx, found),
    ])

"""Section 4: confusion matrices, classes named by meaning, counts and row-normalised.

Diabetes: the lecture model (scored on its own training rows, as the lecture does), the best
model of the search and logistic regression (both on held-out rows: every row once under
cross-validation); digits and wine: the best architecture retrained on them.
"""

from __future__ import annotations

import json

import pandas as pd

from analysis import baseline_runs, leaderboard, lecture, plots
from analysis.context import Context, make_spec

RESERVED = ("dataset", "split", "seed")


def best_specs(ctx: Context) -> dict:
    """The best config from the search, retrained on diabetes and the multi-class datasets."""
    options = {k: v for k, v in leaderboard.best_options(ctx).items() if k not in RESERVED}
    axis = "activation" if "activation" in options else next(iter(options))
    grid = {axis: [options.pop(axis)]}  # a sweep needs one grid axis: a single value
    split = ctx.profile.search_split
    return {ds: make_spec(ctx.profile, f"best-{ds}", dataset=ds, split=split, seeds=[0],
                          fixed=options, grid=grid)
            for ds in ("diabetes", *ctx.profile.multiclass)}


def _per_class(model: str, dataset: str, s: dict) -> pd.DataFrame:
    return pd.DataFrame({"model": model, "dataset": dataset, "class": s["class_names"],
                         "precision": s["precision"], "recall": s["recall"], "f1": s["f1"],
                         "support": s["support"]})


def _figure(ctx: Context, slug: str, title: str, s: dict) -> str:
    names = s["class_names"]
    big = len(names) > 4
    fig, axes = plots.new_figure(12 if big else 9, 5.5 if big else 3.8, ncols=2)
    for ax, key, label, fmt in ((axes[0], "confusion_matrix", "rows (count)", "d"),
                                (axes[1], "confusion_matrix_normalized", "share of true class",
                                 ".2f")):
        table = pd.DataFrame(s[key], index=names, columns=names)
        plots.heatmap(ax, table if fmt == ".2f" else table.astype(int), fmt=fmt,
                      cbar_label=label, cmap="Blues", vmin=0)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title("counts" if fmt == "d" else "row-normalised (recall on the diagonal)")
    return ctx.figure(f"confusion_{slug}", fig, title)


def _models(ctx: Context) -> list[tuple[str, str, str, dict]]:
    """(slug, model, dataset, summary-like dict) of every matrix to draw."""
    lec = ctx.trials(lecture.specs(ctx.profile)["lecture"])
    lec = lec[(lec["epochs"] == lecture.LECTURE_EPOCHS) & (lec["seed"] == 0)].iloc[0]
    label = leaderboard.best_label(ctx)
    out = [("diabetes_lecture", "lecture net (training rows)", "diabetes", lec.to_dict())]
    for ds, spec in best_specs(ctx).items():
        ctx.run(spec)
        out.append((f"{ds}_best", label, ds, ctx.trials(spec).iloc[0].to_dict()))
        if ds == "diabetes":
            lr = baseline_runs.logistic_run("diabetes", ctx.profile.search_split, 0)
            out.append(("diabetes_logreg", "logistic regression", "diabetes", lr))
    return out


def render(ctx: Context) -> str:
    """Retrain the best config where needed and write section 4."""
    parts = ["## 4. Confusion matrices\n",
             "Rows are the true class, columns the predicted one. On diabetes the file's "
             "label 0 means *diabetic* and 1 *not diabetic*; the matrices say so. The lecture "
             "net is scored on the rows it was trained on (the lecture's protocol); the others "
             f"on held-out rows (split {ctx.profile.search_split}, seed 0).\n",
             f"Best model: `{json.dumps(leaderboard.best_options(ctx), sort_keys=True)}`\n"]
    per_class = []
    for slug, model, dataset, s in _models(ctx):
        parts.append(_figure(ctx, slug, f"{dataset}: {model}", s))
        per_class.append(_per_class(model, dataset, s))
    table = pd.concat(per_class, ignore_index=True)
    parts.append(ctx.table("confusion_per_class", table[table["dataset"] == "diabetes"],
                           "Per-class precision and recall, diabetes"))
    parts.append(ctx.table("confusion_per_class_all", table,
                           "All models and datasets", embed=False))
    return "\n".join(parts)

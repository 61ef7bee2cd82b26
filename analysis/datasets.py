"""Section 6: the other datasets — best activation and depth per dataset, against logistic
regression on the same splits."""

from __future__ import annotations

import pandas as pd

from analysis import baseline_runs, grid, plots
from analysis.context import Context, make_spec
from analysis.profiles import Profile
from analysis.tables import mean_pm_std, not_told_apart


def specs(profile: Profile) -> dict:
    """One sweep per dataset: activation x depth at a fixed width."""
    return {ds: make_spec(profile, f"data-{ds}", dataset=ds, split=profile.ds_split,
                          seeds=range(profile.ds_seeds),
                          fixed={**profile.recipe, "epochs": profile.epochs,
                                 "width": profile.ds_width},
                          grid={"activation": list(profile.ds_activations),
                                "depth": list(profile.ds_depths)})
            for ds in profile.datasets}


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over seeds per activation x depth."""
    df = grid.usable(df)
    groups = df.groupby(["activation", "depth"], sort=False)
    out = groups["test_loss"].agg(["mean", "std"]).add_prefix("test_loss_")
    acc = groups["test_accuracy"].agg(["mean", "std"]).add_prefix("test_accuracy_")
    return out.join(acc).reset_index()


def best_row(dataset: str, agg: pd.DataFrame, logreg: pd.DataFrame) -> dict:
    """The lowest mean held-out loss of ``dataset`` beside logistic regression's, and how
    many other cells the seeds cannot tell from it (``not_told_apart``)."""
    scored = agg.dropna(subset=["test_loss_mean"])
    best = scored.loc[scored["test_loss_mean"].idxmin()]
    return {
        "dataset": dataset,
        "best_activation": best["activation"],
        "best_depth": int(best["depth"]),
        "not_told_apart": int(not_told_apart(scored["test_loss_mean"], scored["test_loss_std"],
                                             best.name).sum()),
        "net_test_loss": mean_pm_std(best["test_loss_mean"], best["test_loss_std"]),
        "net_test_accuracy": mean_pm_std(best["test_accuracy_mean"], best["test_accuracy_std"]),
        "logreg_test_loss": mean_pm_std(logreg["test_loss"].mean(), logreg["test_loss"].std()),
        "logreg_test_accuracy": mean_pm_std(logreg["test_accuracy"].mean(),
                                            logreg["test_accuracy"].std()),
        "net_minus_logreg_loss": best["test_loss_mean"] - logreg["test_loss"].mean(),
    }


def _figure(ctx: Context, aggs: dict[str, pd.DataFrame]) -> str:
    fig, axes = plots.new_figure(4.2 * len(aggs), 3.6, ncols=len(aggs), squeeze=False)
    for ax, (name, agg) in zip(axes[0], aggs.items(), strict=True):
        table = agg.pivot(index="activation", columns="depth", values="test_loss_mean")
        plots.heatmap(ax, table.loc[list(dict.fromkeys(agg["activation"]))],
                      cbar_label="held-out log-loss (nats)", cmap="viridis_r", log=True,
                      fmt=".2g")
        ax.set_title(name)
        ax.set_xlabel("depth (hidden layers)")
        ax.set_ylabel("activation")
    return ctx.figure("datasets_test_loss", fig,
                      "Held-out log-loss by activation and depth (log colour scale)")


def render(ctx: Context) -> str:
    """Run one sweep per dataset and write section 6."""
    p = ctx.profile
    aggs, rows = {}, []
    for name, spec in specs(p).items():
        ctx.run(spec)
        aggs[name] = aggregate(ctx.trials(spec))
        logreg = baseline_runs.logistic(name, p.ds_split, range(p.ds_seeds))
        rows.append(best_row(name, aggs[name], logreg))
    long = pd.concat([a.assign(dataset=n) for n, a in aggs.items()], ignore_index=True)
    return "\n".join([
        "## 6. Other datasets\n",
        f"Activations {', '.join(p.ds_activations)} × depths "
        f"{', '.join(map(str, p.ds_depths))} at width {p.ds_width}, same recipe as section 2, "
        f"split {p.ds_split}, {p.ds_seeds} seed(s) (each seed also draws its own split). "
        "Logistic regression (scikit-learn, z-scored features) is fitted on the same "
        "splits.\n",
        ctx.table("datasets_best", pd.DataFrame(rows), "Best net per dataset vs logistic "
                  "regression (mean ± std over seeds; `not_told_apart`: how many other "
                  "activation × depth cells have a mean within a standard deviation over seeds "
                  "of the best's)"),
        _figure(ctx, aggs),
        ctx.table("datasets_all", long.round(6), "Every cell", embed=False),
    ])

"""Section 2: final loss per activation x depth x width on diabetes (held-out rows)."""

from __future__ import annotations

import pandas as pd

from analysis import plots
from analysis.context import Context, make_spec
from analysis.profiles import Profile
from analysis.tables import mean_pm_std

KEYS = ["activation", "depth", "width"]
METRICS = {  # summary key -> (column stem, colour-bar label)
    "test_loss": ("test_loss", "held-out log-loss (nats)"),
    "test_accuracy": ("test_accuracy", "held-out accuracy"),
    "final_train_loss": ("train_loss", "final training loss (nats)"),
}
LOSS_CAP = 10.0  # nats: colour-scale top; a near-diverged net can reach 1e21
STUCK_MARGIN = 0.01  # same margin as the run's "left the plateau" test


def specs(profile: Profile) -> dict:
    spec = make_spec(profile, "grid", seeds=range(profile.seeds),
                     fixed={**profile.recipe, "epochs": profile.epochs},
                     grid={"activation": profile.grid_activations(),
                           "depth": list(profile.depths), "width": list(profile.widths)})
    return {"grid": spec}


def usable(df: pd.DataFrame) -> pd.DataFrame:
    """Trials that ran to the end (complete or diverged); failed ones have no summary."""
    return df[df["status"] != "failed"].copy()


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over seeds per activation x depth x width (diverged runs have
    no test scores and are counted, not averaged)."""
    df = usable(df)
    df["stuck"] = df["final_train_loss"].isna() | (
        df["final_train_loss"] > df["base_rate_loss"] - STUCK_MARGIN)
    groups = df.groupby(KEYS, sort=False)
    out = groups.size().rename("seeds").to_frame()
    for key, (stem, _) in METRICS.items():
        values = groups[key].agg(["mean", "std"])
        out[f"{stem}_mean"], out[f"{stem}_std"] = values["mean"], values["std"]
    out["diverged"] = groups["diverged"].sum().astype(int)
    out["stuck_at_prior"] = groups["stuck"].sum().astype(int)
    return out.reset_index()


def pivot(agg: pd.DataFrame, width: int, column: str) -> pd.DataFrame:
    """activation (rows, registry order) x depth (columns) for one width."""
    part = agg[agg["width"] == width]
    table = part.pivot(index="activation", columns="depth", values=column)
    return table.loc[list(dict.fromkeys(part["activation"]))]


def _heatmap(ctx: Context, agg: pd.DataFrame, width: int, key: str) -> str:
    stem, label = METRICS[key]
    table = pivot(agg, width, f"{stem}_mean")
    fig, ax = plots.new_figure(7.5, 0.32 * len(table) + 2.0)
    loss = key != "test_accuracy"  # losses span decades (memorised vs diverging nets)
    suffix = f", log, capped at {LOSS_CAP:g}" if loss else ""
    plots.heatmap(ax, table, cbar_label=f"{label}, mean over seeds{suffix}",
                  cmap="viridis_r" if loss else "viridis", log=loss, cap=LOSS_CAP,
                  fmt=".2g" if loss else ".2f")  # bright = good
    ax.set_xlabel("depth (hidden layers)")
    ax.set_ylabel("activation")
    return ctx.figure(f"grid_{stem}_width{width}", fig,
                      f"Diabetes, width {width}: {label} by activation and depth")


def best_table(agg: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The ``n`` lowest mean held-out losses, formatted mean ± std."""
    top = agg.dropna(subset=["test_loss_mean"]).nsmallest(n, "test_loss_mean")
    return pd.DataFrame({
        **{k: top[k].values for k in KEYS},
        "test_loss": [mean_pm_std(m, s) for m, s in zip(top["test_loss_mean"],
                                                        top["test_loss_std"], strict=True)],
        "test_accuracy": [mean_pm_std(m, s) for m, s in zip(
            top["test_accuracy_mean"], top["test_accuracy_std"], strict=True)],
        "train_loss": [mean_pm_std(m, s) for m, s in zip(
            top["train_loss_mean"], top["train_loss_std"], strict=True)],
    })


def stuck_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Share of runs per depth x width that never got below the prior's loss."""
    sums = agg.groupby(["width", "depth"])[["stuck_at_prior", "seeds"]].sum()
    share = (sums["stuck_at_prior"] / sums["seeds"]).rename("share").reset_index()
    table = share.pivot(index="width", columns="depth", values="share")
    table.columns = [f"depth {d}" for d in table.columns]
    return table.reset_index()


def _overfit_note(agg: pd.DataFrame) -> str:
    gap = (agg["test_loss_mean"] - agg["train_loss_mean"]).dropna()
    worst = agg.loc[gap.idxmax()] if len(gap) else None
    if worst is None:
        return ""
    return (f"Training loss alone rewards memorising: the largest gap between held-out and "
            f"training loss is {worst['activation']} depth {worst['depth']} width "
            f"{worst['width']}, training loss {worst['train_loss_mean']:.3g} against held-out "
            f"loss {worst['test_loss_mean']:.3g}.\n")


def render(ctx: Context) -> str:
    """Run the grid sweep and write section 2."""
    p = ctx.profile
    spec = specs(p)["grid"]
    ctx.run(spec)
    agg = aggregate(ctx.trials(spec))
    parts = [
        "## 2. Final loss per activation × depth × width\n",
        f"Every registered activation ({len(p.grid_activations())}), depths "
        f"{', '.join(map(str, p.depths))}, widths {', '.join(map(str, p.widths))}; "
        f"{p.recipe['optimizer']} lr {p.recipe['lr']}, {p.epochs} full-batch epochs, "
        f"PyTorch's default init, z-scored features, stratified 80/20 holdout, "
        f"{p.seeds} seeds (mean ± sample std). Blank cells: every seed diverged.\n",
        ctx.table("grid_final_loss", agg.round(6), "All cells, mean and std over seeds",
                  embed=False),
        ctx.table("grid_best", best_table(agg), "The ten lowest held-out losses"),
        ctx.table("grid_stuck_share", stuck_table(agg),
                  "Share of runs whose training loss never got below the prior's entropy "
                  "(a net that learned nothing)"),
        _overfit_note(agg),
    ]
    for width in p.widths:
        parts.append(_heatmap(ctx, agg, width, "test_loss"))
        parts.append(_heatmap(ctx, agg, width, "test_accuracy"))
        parts.append(_heatmap(ctx, agg, width, "final_train_loss"))
    return "\n".join(parts)


"""Section 3, second half: PyTorch's default init against xavier, kaiming and lecun."""

from __future__ import annotations

import pandas as pd

from analysis import grid, plots
from analysis.context import Context, make_spec
from analysis.profiles import Profile
from analysis.tables import geomean, mean_pm_std, not_told_apart


def specs(profile: Profile) -> dict:
    spec = make_spec(profile, "init", seeds=range(profile.seeds),
                     fixed={**profile.recipe, "epochs": profile.epochs,
                            "depth": profile.grad_depth, "width": profile.init_width},
                     grid={"activation": list(profile.init_activations),
                           "init": list(profile.inits)})
    return {"init": spec}


def layer_rows(records: list[dict]) -> pd.DataFrame:
    """Per-layer gradient norm at init of every trial."""
    return pd.DataFrame([
        {**r["point"], "seed": r["seed"], "layer": p["layer"] + 1, "grad_norm": p["grad_norm"]}
        for r in records for p in r["probes"] if p["fold"] == 0 and p["epoch"] == 0])


def summary_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per activation x init: gradient ratios and held-out scores over seeds."""
    df = grid.usable(trials)
    rows = []
    for (act, init), g in df.groupby(["activation", "init"], sort=False):
        rows.append({
            "activation": act, "init": init, "seeds": len(g),
            "ratio_at_init": geomean(g["grad_ratio_init"]),
            "ratio_after_training": geomean(g["grad_ratio_final"]),
            "test_loss": mean_pm_std(g["test_loss"].mean(), g["test_loss"].std()),
            "test_accuracy": mean_pm_std(g["test_accuracy"].mean(), g["test_accuracy"].std()),
            "test_loss_mean": g["test_loss"].mean(),
            "test_loss_std": g["test_loss"].std(),
            "diverged": int(g["diverged"].sum()),
        })
    return pd.DataFrame(rows)


def _figure(ctx: Context, rows: pd.DataFrame) -> str:
    p = ctx.profile
    agg = rows.groupby(["activation", "init", "layer"], sort=False)["grad_norm"]
    data = agg.agg(geomean).reset_index()
    data = data[data["grad_norm"] > 0]
    fig, axes = plots.facet_lines(data, x="layer", y="grad_norm", col="activation", hue="init",
                                  col_wrap=4, height=2.6, xlabel="layer (1 = input)",
                                  ylabel="‖∂loss/∂W‖ at init (log)")
    for ax in axes:
        ax.set_yscale("log")
    return ctx.figure("init_grad_layers", fig,
                      f"Per-layer gradient norm at init by initialisation, depth "
                      f"{p.grad_depth}, width {p.init_width}")


def _best_text(table: pd.DataFrame) -> str:
    """Per activation, the init with the lowest mean held-out loss, and the inits the seeds
    cannot tell from it: a mean within the larger of the two standard deviations over seeds
    (on a net stuck at the prior, every init scores the same loss)."""
    lines = []
    for act, g in table.groupby("activation", sort=False):
        scored = g.dropna(subset=["test_loss_mean"])
        if scored.empty:
            continue
        best = scored.loc[scored["test_loss_mean"].idxmin()]
        tied = scored[not_told_apart(scored["test_loss_mean"], scored["test_loss_std"],
                                     best.name)]
        line = (f"- {act}: lowest held-out loss with init={best['init']} ({best['test_loss']}), "
                f"first/last ratio at init {best['ratio_at_init']:.2g}")
        if not tied.empty:
            line += ("; not told apart by the seeds (mean within a standard deviation over "
                     "seeds): " + ", ".join(f"{r['init']} ({r['test_loss']})"
                                             for _, r in tied.iterrows()))
        lines.append(line)
    return "\n".join(lines) + "\n"


def render(ctx: Context) -> str:
    """Run the init sweep and write its part of section 3."""
    p = ctx.profile
    spec = specs(p)["init"]
    ctx.run(spec)
    table = summary_table(ctx.trials(spec))
    return "\n".join([
        "### Initialisation\n",
        f"Depth {p.grad_depth}, width {p.init_width}, same recipe as section 2; `default` is "
        "PyTorch's own Linear init, `lecun` is LeCun normal (what SELU needs to "
        "self-normalise).\n",
        _figure(ctx, layer_rows(ctx.records(spec))),
        _best_text(table),
        ctx.table("init_compare", table.drop(columns=["test_loss_mean", "test_loss_std"]),
                  "Per init"),
    ])

"""Section 3: gradient vanishing per activation, read from the grid sweep's probe records.

Gradient norms are the L2 norms of each Linear weight's gradient on the full training
batch, input layer first; "first/last ratio" is the input layer's norm over the output
layer's (<< 1: gradients vanish on their way to the input). Over seeds they are averaged
geometrically, since they span decades.
"""

from __future__ import annotations

import pandas as pd

from analysis import grid, inits, plots
from analysis.context import Context
from analysis.tables import fmt_value, geomean

WHEN = {0: "at init", -1: "after training"}
FOCUS = ("sigmoid", "tanh", "relu", "selu")  # named in the text when present


def layer_rows(records: list[dict], depth: int) -> pd.DataFrame:
    """Probe rows (init and final) of every trial at ``depth``, flat."""
    rows = []
    for r in records:
        if r["point"]["depth"] != depth:
            continue
        for p in r["probes"]:
            if p["fold"] == 0 and p["epoch"] in WHEN:
                rows.append({**r["point"], "seed": r["seed"], "when": WHEN[p["epoch"]],
                             "layer": p["layer"] + 1, "grad_norm": p["grad_norm"],
                             "saturated": p["saturated"], "dead": p["dead"]})
    return pd.DataFrame(rows)


def layer_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per activation x width x layer: geometric-mean grad norm, mean saturated/dead share."""
    groups = rows.groupby(["activation", "width", "layer", "when"], sort=False)
    out = groups["grad_norm"].agg(geomean).rename("grad_norm").to_frame()
    out["saturated"] = groups["saturated"].mean()
    out["dead"] = groups["dead"].mean()
    wide = out.unstack("when")
    wide.columns = [f"{metric}_{when.replace(' ', '_')}" for metric, when in wide.columns]
    return wide.reset_index()


def ratio_table(trials: pd.DataFrame) -> pd.DataFrame:
    """First/last gradient ratio per activation x depth x width, at init and after training."""
    df = grid.usable(trials)
    groups = df.groupby(grid.KEYS, sort=False)
    out = pd.DataFrame({"ratio_at_init": groups["grad_ratio_init"].agg(geomean),
                        "ratio_after_training": groups["grad_ratio_final"].agg(geomean)})
    return out.reset_index()


def _layer_heatmap(ctx: Context, table: pd.DataFrame, width: int, when: str, depth: int):
    part = table[table["width"] == width]
    column = f"grad_norm_{when.replace(' ', '_')}"
    heat = part.pivot(index="layer", columns="activation", values=column)
    heat = heat[list(dict.fromkeys(part["activation"]))]
    fig, ax = plots.new_figure(0.38 * heat.shape[1] + 3.0, 0.3 * heat.shape[0] + 2.5)
    plots.heatmap(ax, heat, cbar_label="‖∂loss/∂W‖ (log scale)", log=True, fmt=".1e",
                  annot=heat.size <= 120)
    ax.set_xlabel("activation")
    ax.set_ylabel("layer (1 = input, last = output)")
    name = f"grad_layers_{when.replace(' ', '_')}_width{width}"
    return ctx.figure(name, fig, f"Per-layer gradient norm {when}, depth {depth}, "
                                 f"width {width} (diabetes)")


def _ratio_figure(ctx: Context, ratios: pd.DataFrame) -> str:
    long = ratios.melt(id_vars=grid.KEYS, var_name="when", value_name="ratio")
    long["when"] = long["when"].map({"ratio_at_init": "at init",
                                     "ratio_after_training": "after training"})
    long = long[long["ratio"] > 0].astype({"width": str})  # width as a category, not a scale
    fig, axes = plots.facet_lines(long, x="depth", y="ratio", col="activation", hue="width",
                                  style="when", col_wrap=5, height=2.2,
                                  xlabel="depth (log scale)", ylabel="first / last grad norm")
    for ax in axes:
        ax.set_yscale("log")
        plots.log2_depth_axis(ax, long["depth"].unique())
        ax.axhline(1.0, color="grey", linewidth=0.8)
    return ctx.figure("grad_ratio_vs_depth", fig,
                      "First-layer / last-layer gradient norm vs depth (log y), diabetes")


def _saturation_figure(ctx: Context, table: pd.DataFrame, width: int, depth: int) -> str:
    part = table[table["width"] == width]
    hidden = part[part["layer"] <= depth]  # the output layer has no activation
    order = list(dict.fromkeys(part["activation"]))
    fig, axes = plots.new_figure(0.35 * len(order) * 2 + 4, 0.55 * depth + 4, nrows=2, ncols=2)
    for i, metric in enumerate(("saturated", "dead")):
        for j, when in enumerate(WHEN.values()):
            col = f"{metric}_{when.replace(' ', '_')}"
            heat = hidden.pivot(index="layer", columns="activation", values=col)[order]
            plots.heatmap(axes[i, j], heat, cbar_label=f"share of units {metric}", annot=False,
                          vmin=0.0, vmax=1.0, cmap="rocket_r")
            axes[i, j].set_title(f"{metric} {when}")
            axes[i, j].set_xlabel("activation")
            axes[i, j].set_ylabel("hidden layer")
    return ctx.figure(f"saturation_width{width}", fig,
                      f"Saturated and dead units per layer, depth {depth}, width {width}")


def _focus_text(ratios: pd.DataFrame, depth: int) -> str:
    at = ratios[ratios["depth"] == depth]
    lines = []
    for width in sorted(at["width"].unique()):
        part = at[at["width"] == width].set_index("activation")
        named = [a for a in FOCUS if a in part.index] or list(part.index[:4])
        pairs = ", ".join(f"{a} {fmt_value(part.loc[a, 'ratio_at_init'], 2)} → "
                          f"{fmt_value(part.loc[a, 'ratio_after_training'], 2)}" for a in named)
        lines.append(f"- width {width}, depth {depth}, first/last ratio at init → after "
                     f"training: {pairs}")
    return "\n".join(lines) + "\n"


def render(ctx: Context) -> str:
    """Write section 3 from the grid sweep's records, then the init comparison."""
    p = ctx.profile
    spec = grid.specs(p)["grid"]
    ctx.run(spec)  # nothing to do once section 2 ran: read back from storage
    rows = layer_rows(ctx.records(spec), p.grad_depth)
    table = layer_table(rows)
    ratios = ratio_table(ctx.trials(spec))
    parts = [
        "## 3. Gradient vanishing per activation\n",
        f"Probed on the full training batch of the section-2 runs: per-layer gradient norms "
        f"of the depth-{p.grad_depth} nets at initialisation and after training (geometric "
        "mean over seeds), the first/last ratio for every depth, and the share of saturated "
        "units (slope below 1 % of the activation's maximum) and dead units (saturated on "
        "every row).\n",
        _focus_text(ratios, p.grad_depth),
        _ratio_figure(ctx, ratios),
        ctx.table("grad_ratio_by_depth", ratios, "First/last ratios", embed=False),
        ctx.table(f"grad_layers_depth{p.grad_depth}", table,
                  "Per-layer gradient norms and saturated/dead shares", embed=False),
    ]
    for width in p.widths:
        for when in WHEN.values():
            parts.append(_layer_heatmap(ctx, table, width, when, p.grad_depth))
        parts.append(_saturation_figure(ctx, table, width, p.grad_depth))
    parts.append(inits.render(ctx))
    return "\n".join(parts)

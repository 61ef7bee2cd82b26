"""Shared plotting helpers: headless (Agg), titled, labelled, saved under stable names.

Every figure of the report goes through :func:`save`, which sets the title, writes a PNG
and closes the figure (a long report would otherwise keep every figure in memory).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report runs on machines without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

DPI = 110


def new_figure(width: float = 7.0, height: float = 4.5, **kwargs):
    """A fresh figure and axes with the report's style."""
    sns.set_theme(style="whitegrid", context="notebook")
    return plt.subplots(figsize=(width, height), **kwargs)


def save(fig, path: Path, title: str | None = None) -> Path:
    """Give ``fig`` its title, write it as PNG at ``path`` and close it."""
    facet = bool(fig.legends)  # a seaborn FacetGrid: it already made room for its legend
    if title:
        fig.suptitle(title, y=1.03 if facet else 0.98)
    if not facet:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # a tight bounding box costs a second draw: only where a figure legend needs it
    fig.savefig(path, dpi=DPI, bbox_inches="tight" if facet else None)
    plt.close(fig)
    return path


def heatmap(ax, table: pd.DataFrame, *, cbar_label: str, log: bool = False,
            annot: bool = True, fmt: str = ".2f", cmap: str = "viridis",
            cap: float | None = None, **kwargs):
    """Draw ``table`` (rows x columns) as a heatmap; ``log`` uses a log colour scale.

    NaN cells (diverged runs, missing layers) stay blank. With a log scale, non-positive
    values are masked too: a log colour scale cannot show them. ``cap`` tops the colour
    scale, so one near-diverged cell does not wash out the rest (its annotation stays exact).
    """
    values = table.astype(float) if log or fmt != "d" else table  # "d" needs integers
    norm = None
    if log:
        positive = values.where(values > 0)
        if positive.notna().any().any():
            top = float(np.nanmax(positive.values))
            norm = LogNorm(vmin=float(np.nanmin(positive.values)),
                           vmax=min(top, cap) if cap else top)
        values = positive
    annot_ok = annot and values.size <= 400  # bigger grids turn into unreadable text
    sns.heatmap(values, ax=ax, norm=norm, annot=annot_ok, fmt=fmt, cmap=cmap,
                cbar_kws={"label": cbar_label}, annot_kws={"fontsize": 7}, **kwargs)
    return ax


def facet_lines(data: pd.DataFrame, *, x: str, y: str, col: str, hue: str,
                style: str | None = None, col_wrap: int = 4, height: float = 2.4,
                aspect: float = 1.2, xlabel: str = "", ylabel: str = ""):
    """One panel per value of ``col`` (in order of appearance), a line per value of ``hue``
    (colour) and of ``style`` (dashes), a marker at each point; one legend for all panels.

    What seaborn's ``relplot(kind="line")`` draws for one row per point, in plain matplotlib:
    relplot lays a 25-panel figure out several times over (6 s of the report's 20 s in
    section 3 on the dev VM, against ~1 s here). Returns (figure, the panels' axes).
    """
    sns.set_theme(style="whitegrid", context="notebook")
    panels = list(dict.fromkeys(data[col]))
    ncols = min(col_wrap, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(ncols * height * aspect, nrows * height),
                             sharex=True, sharey=True, squeeze=False)
    hues = list(dict.fromkeys(data[hue]))
    colors = dict(zip(hues, sns.color_palette("deep", len(hues)), strict=True))
    styles = list(dict.fromkeys(data[style])) if style else [None]
    dashes = dict(zip(styles, ["-", "--", ":", "-."] * len(styles), strict=False))
    keys = [hue] + ([style] if style else [])
    axes = list(grid.flat[:len(panels)])
    for ax, name in zip(axes, panels, strict=True):
        for key, line in data[data[col] == name].groupby(keys, sort=False):
            line = line.sort_values(x)
            ax.plot(line[x], line[y], color=colors[key[0]],
                    linestyle=dashes[key[1] if style else None], marker="o", markersize=4)
        ax.set_title(str(name))
    for i, ax in enumerate(axes):  # labels on the outer panels, as relplot puts them
        if i + ncols >= len(panels):  # nothing below it
            ax.set_xlabel(xlabel)
            ax.tick_params(labelbottom=True)
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
    for ax in grid.flat[len(panels):]:
        ax.remove()
    handles = [Line2D([], [], color=colors[h], marker="o", label=str(h)) for h in hues]
    labels = [f"{hue} = {h}" for h in hues]
    if style:
        handles += [Line2D([], [], color="grey", linestyle=dashes[v]) for v in styles]
        labels += [f"{style} = {v}" for v in styles]
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig, axes


def base_rate_line(ax, value: float, label: str = "base-rate loss") -> None:
    """A dashed horizontal line at the constant predictor's loss."""
    ax.axhline(value, color="black", linestyle="--", linewidth=1,
               label=f"{label} {value:.4f}")


def log2_depth_axis(ax, depths) -> None:
    """Depth on a log-2 x axis, ticked at the depths that were run."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(depths), labels=[str(d) for d in sorted(depths)])
    ax.minorticks_off()


def machine_caption(env: dict) -> str:
    """The machine a figure's numbers came from, for its title."""
    device = env.get("cuda_device") or env.get("cpu_model") or "unknown CPU"
    return f"{device}, torch {env.get('torch_version', '?')}"

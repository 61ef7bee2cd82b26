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
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
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
            cap: float | None = None, vmin: float | None = None, vmax: float | None = None):
    """Draw ``table`` (rows x columns, first row on top) as a heatmap with a colour bar;
    ``log`` uses a log colour scale.

    NaN cells (diverged runs, missing layers) stay blank. With a log scale, non-positive
    values are masked too: a log colour scale cannot show them. ``cap`` tops the colour
    scale, so one near-diverged cell does not wash out the rest (its annotation stays exact).

    NOTE: drawn with matplotlib as seaborn's heatmap draws it, less the whole-figure draw
    seaborn makes in every call to see whether tick labels overlap (about 0.5 s each, ~20
    heatmaps in a report); long column labels are turned upright instead.
    """
    values = table.astype(float)
    if log:
        values = values.where(values > 0)
    grid = np.ma.masked_invalid(values.to_numpy(dtype=float))
    low = vmin if vmin is not None else (float(grid.min()) if grid.count() else 0.0)
    high = vmax if vmax is not None else (float(grid.max()) if grid.count() else 1.0)
    if cap is not None:
        high = min(high, cap)
    norm = LogNorm(vmin=low, vmax=high) if log and grid.count() else Normalize(low, high)
    colours = plt.get_cmap(cmap).with_extremes(bad=(0, 0, 0, 0))  # NaN: blank
    mesh = ax.pcolormesh(grid, cmap=colours, norm=norm)
    n_rows, n_cols = grid.shape
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    columns = [str(c) for c in table.columns]
    cell = ax.figure.get_figwidth() * ax.get_position().width / max(n_cols, 1)  # inches
    upright = max(map(len, columns), default=0) * 0.09 > cell  # ~0.09 in per character
    ax.set_xticks(np.arange(n_cols) + 0.5, labels=columns, rotation=90 if upright else 0)
    ax.set_yticks(np.arange(n_rows) + 0.5, labels=[str(r) for r in table.index])
    ax.tick_params(length=0)
    ax.set_xlabel(table.columns.name or "")
    ax.set_ylabel(table.index.name or "")
    bar = ax.figure.colorbar(mesh, ax=ax)
    bar.set_label(cbar_label)
    bar.outline.set_visible(False)
    if annot and table.size <= 400:  # bigger grids turn into unreadable text
        rgb = mesh.to_rgba(grid)[..., :3]  # text dark on light cells, as seaborn's
        rgb = np.where(rgb <= 0.03928, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
        light = rgb @ np.array([0.2126, 0.7152, 0.0722]) > 0.408
        blank = np.ma.getmaskarray(grid)
        for (i, j), value in np.ndenumerate(table.to_numpy()):
            if not blank[i, j]:
                ax.text(j + 0.5, i + 0.5, format(value, fmt), ha="center", va="center",
                        fontsize=7, color=".15" if light[i, j] else "w")
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

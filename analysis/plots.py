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

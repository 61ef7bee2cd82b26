"""Tables: each one written as CSV (for tools) and Markdown (for the report)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd


def fmt_value(value, digits: int = 4) -> str:
    """One cell as text: floats to ``digits`` significant places, missing as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|")


def to_markdown(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table (pandas' own needs the tabulate package)."""
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(fmt_value(v, digits) for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


# Means closer than this (below the 3 digits the tables show) count as equal.
SAME_LOSS = 5e-4


def not_told_apart(mean: pd.Series, std: pd.Series, best) -> pd.Series:
    """Which rows the seeds cannot tell from row ``best`` (the lowest mean): a mean within the
    larger of the two standard deviations over seeds. ``best`` itself is False."""
    spread = np.maximum(std.fillna(0.0), 0.0 if pd.isna(std[best]) else std[best])
    return (mean.index != best) & (mean - mean[best] <= spread + SAME_LOSS)


def mean_pm_std(mean: float | None, std: float | None, digits: int = 3) -> str:
    """``0.512 ± 0.013``; the std is left out where there is only one value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def geomean(values) -> float:
    """Geometric mean of the positive values (NaN when there are none): for quantities such
    as gradient norms that span decades."""
    v = np.asarray([x for x in values if x is not None and x > 0], dtype=float)
    return float(np.exp(np.log(v).mean())) if v.size else float("nan")


def write_table(folder: Path, name: str, df: pd.DataFrame) -> tuple[Path, Path]:
    """Write ``name.csv`` and ``name.md`` under ``folder``; return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / f"{name}.csv", folder / f"{name}.md"
    df.to_csv(csv_path, index=False)
    md_path.write_text(to_markdown(df) + "\n")
    return csv_path, md_path

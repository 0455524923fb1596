"""PNG charts of table views (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from massquant.reporting.results import writing


def delta_bars(rows: list[dict], columns: dict[str, str], row_keys: list[str], title: str, path: str | Path) -> Path:
    """Horizontal bars, one group per table row and one bar per value column; the baseline is the zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [key for key in columns if key not in row_keys]
    labels = [" / ".join(str(row.get(key)) for key in row_keys) for row in rows]
    height = 0.8 / max(len(series), 1)
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.35 * len(rows) * max(len(series), 1) ** 0.5))
    for index, key in enumerate(series):
        values = [row.get(key) for row in rows]
        # a missing or non-finite cell draws no bar (NaN), rather than a misleading zero
        values = [value if isinstance(value, (int, float)) and math.isfinite(value) else math.nan for value in values]
        offsets = [position + (index - (len(series) - 1) / 2) * height for position in range(len(rows))]
        axes.barh(offsets, values, height=height, label=columns[key])
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(rows)), labels)
    axes.invert_yaxis()  # first row on top, as in the table
    axes.set_xlabel(title)
    if len(series) > 1:
        axes.legend(fontsize="small")
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    try:
        with writing(path) as path:
            figure.savefig(path, dpi=120)
    finally:
        plt.close(figure)
    return path

"""Tables printed with tabulate, from plain row dicts."""

from __future__ import annotations

import math

from tabulate import tabulate

TABLE_FORMATS = ("github", "simple", "latex", "tsv", "plain")


def format_cell(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.{digits}f}"


def format_delta(value, digits: int = 4) -> str:
    return "" if value is None else ("+" if value > 0 else "") + format_cell(value, digits)


def render(rows: list[dict], columns: dict[str, str], table_format: str = "github") -> str:
    """``columns`` maps a row key to its header; a missing key is an empty cell."""
    body = [[format_cell(row.get(key)) for key in columns] for row in rows]
    return tabulate(body, headers=list(columns.values()), tablefmt=table_format, disable_numparse=True)

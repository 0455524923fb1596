"""Tables from plain row dicts: tabulate for the terminal, Markdown and LaTeX; csv for spreadsheets.

``pivot`` turns long rows (one per measurement) into a grid: rows keyed by some
fields, one column per value of another field (e.g. mitigation x spec).
"""

from __future__ import annotations

import csv
import io
import math

from tabulate import tabulate

from massquant.errors import UserError

# tabulate formats, plus "markdown" (a pipe table) and "csv" (raw numbers, not rounded)
TABLE_FORMATS = ("github", "simple", "markdown", "latex", "csv", "tsv", "plain")
_TABULATE_NAMES = {"markdown": "github", "latex": "latex_booktabs"}


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


def render(rows: list[dict], columns: dict[str, str], table_format: str = "github", signed=()) -> str:
    """``columns`` maps a row key to its header; a missing key is an empty cell; ``signed`` keys print +/-."""
    if table_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns.values())
        writer.writerows([["" if row.get(key) is None else row[key] for key in columns] for row in rows])
        return buffer.getvalue().rstrip("\n")
    body = [[(format_delta if key in signed else format_cell)(row.get(key)) for key in columns] for row in rows]
    text = tabulate(
        body, headers=list(columns.values()), tablefmt=_TABULATE_NAMES.get(table_format, table_format), disable_numparse=True
    )
    # tabulate escapes LaTeX's special characters; Δ is not one of them but pdflatex needs it in math mode
    return text.replace("Δ", "$\\Delta$") if table_format == "latex" else text


def _identifying(row: dict) -> dict:
    """Text and integer fields (names, settings, counts): what can tell two results apart for a reader."""
    return {
        key: value for key, value in row.items()
        if isinstance(value, (str, int)) and not isinstance(value, bool) and key != "cell"
    }


def pivot(rows: list[dict], row_keys: list[str], col_key: str, value: str) -> tuple[list[dict], dict[str, str]]:
    """One output row per distinct ``row_keys`` values, one column per distinct ``col_key`` value (in order of
    appearance), holding ``value``. Returns rows and the columns mapping for ``render``; a missing cell is None.

    Two input rows landing in one cell would hide a measurement, so that is an error naming what tells them apart.
    """
    columns = {key: key for key in row_keys}
    table: dict[tuple, dict] = {}
    origins: dict[tuple, dict] = {}
    for row in rows:
        label = tuple(row.get(key) for key in row_keys)
        column = f"{col_key}={row.get(col_key)}"
        columns.setdefault(column, str(row.get(col_key)))
        target = table.setdefault(label, {key: row.get(key) for key in row_keys})
        if column in target:
            first, second = _identifying(origins[label + (column,)]), _identifying(row)
            differ = sorted(key for key in first.keys() | second.keys() if first.get(key) != second.get(key))
            raise UserError(
                f"two results share {', '.join(f'{k}={v}' for k, v in zip(row_keys, label))} and {col_key}={row.get(col_key)}; "
                f"add a row key that tells them apart (they differ in: {', '.join(differ) or 'nothing: the same result twice'})"
            )
        target[column] = row.get(value)
        origins[label + (column,)] = row
    return list(table.values()), columns


def mitigation_grid(rows: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """Rows = mitigation (and massive policy where it varies), columns = spec, cells = "ppl (Δ)", then what each
    mitigation did to the outliers of the unquantized model: largest |a| and mean excess kurtosis."""
    row_keys = ["mitigation"] + (["massive"] if len({row.get("massive") for row in rows}) > 1 else [])
    cells = [{**row, "cell": ppl_with_delta(row)} for row in rows]
    table, columns = pivot(cells, row_keys, "spec", "cell")
    outliers = {row.get("mitigation"): row["outliers"] for row in rows if row.get("outliers")}
    for line in table:
        summary = outliers.get(line["mitigation"], {})
        line.update(max_abs=summary.get("max_abs"), kurtosis=summary.get("mean_kurtosis"))
    return table, {**columns, "max_abs": "max |a| (unquantized)", "kurtosis": "mean kurtosis"}


def ppl_with_delta(row: dict) -> str | None:
    """``"22.7558 (+0.5987)"``: a row's perplexity and its Δ against the baseline (none for the baseline itself)."""
    if row.get("ppl") is None:
        return None
    delta = row.get("delta_ppl")
    return format_cell(row["ppl"]) + (f" ({format_delta(delta)})" if delta else "")


def row_notes(row: dict) -> str:
    """What a reader must know to read a perplexity: broken windows and where they broke; values kept unquantized."""
    notes = []
    if row.get("not_applicable"):
        notes.append(f"not applicable: {row['not_applicable']}")
    if row.get("non_finite_windows"):
        notes.append(f"{row['non_finite_windows']}/{row['windows']} windows non-finite, first in {row['first_non_finite']}")
    massive = (row.get("quantization") or {}).get("massive") or {}
    if "kept_values" in massive:
        notes.append(f"kept {massive['kept_values']} values unquantized ({massive['kept_fraction']:.1e} of linear inputs)")
    return "; ".join(notes)


TASK_COLUMNS = {
    "config": "config",
    "task": "task",
    "metric": "metric",
    "value": "value",
    "stderr": "± stderr",
    "delta_text": "Δ",
    "interval_text": "CI of Δ",
    "significant_text": "sig.",
}


def task_table_rows(rows: list[dict]) -> list[dict]:
    """One line per configuration x task x metric, with lm-eval's stderr and the paired-bootstrap Δ interval."""
    lines = []
    for row in rows:
        for name, entry in row.get("tasks", {}).items():
            for metric, score in entry["metrics"].items():
                interval = ""
                if score.get("ci_low") is not None:
                    interval = f"[{format_delta(score['ci_low'])}, {format_delta(score['ci_high'])}]"
                lines.append({
                    "config": row["config"], "task": name, "metric": metric, "value": score["value"],
                    "stderr": score["stderr"], "delta_text": format_delta(score.get("delta")), "interval_text": interval,
                    "significant_text": {True: "*", False: "", None: ""}[score.get("significant")],
                })
    return lines

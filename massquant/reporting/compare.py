"""Saved results as one list of rows, and the table views drawn from them (``massquant run`` and ``compare``).

``massquant eval`` and ``massquant train`` results.json files and ``massquant run``
directories hold rows; here they get the same fields (model, data, window
settings, then the variant and its numbers), and every Δ is recomputed against
the baseline of its own group (same model, text and windows), wherever that
baseline came from. A training run's rows carry their ``stage`` (before,
surgery, after): with several runs of one model, the shared ``before`` rows
are the same measurement and are shown once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from massquant.errors import UserError
from massquant.evaluation.tasks import TaskSettings, task_deltas
from massquant.reporting.tables import pivot

GROUP_KEYS = ("model", "dtype", "data", "seq_len", "max_tokens", "stride", "bos")  # rows sharing these share a baseline
VARIANT_KEYS = ("mitigation", "massive", "spec", "stage")  # spec names carry their backend (w8@bnb); stage: train runs
ROW_KEYS = GROUP_KEYS + VARIANT_KEYS + ("config", "backend", "source")  # what --rows / --cols accept
BASE_METRICS = ("ppl", "mean_nll")
PERPLEXITY_VALUES = BASE_METRICS + ("delta_ppl", "delta_mean_nll", "tokens", "windows", "seconds", "setup_seconds")
DELTA = "delta_"
HEADERS = {"ppl": "perplexity", "delta_ppl": "Δppl", "mean_nll": "mean NLL", "delta_mean_nll": "Δ mean NLL"}


def header(key: str) -> str:
    return HEADERS.get(key, f"Δ{key[len(DELTA):]}" if key.startswith(DELTA) else key)


def results_file(path: str | Path) -> Path:
    path = Path(path)
    candidate = path / "results.json" if path.is_dir() else path
    if not candidate.is_file():
        raise UserError(f"no results at '{path}': expected a results.json file or a directory holding one (massquant eval --out / massquant run)")
    return candidate


def _eval_rows(payload: dict) -> list[dict]:
    """``massquant eval`` and ``train`` keep model and text once per file; each row gets them here."""
    model, data = payload.get("model") or {}, payload.get("data") or payload.get("eval_data") or {}
    where = {
        "model": model.get("reference"),
        "dtype": model.get("dtype"),
        "model_fingerprint": model.get("fingerprint"),
        **{key: data.get(key) for key in GROUP_KEYS if key not in ("model", "dtype")},
    }
    return [{**where, **row} for row in payload.get("rows", [])]


def load_payload(path: str | Path) -> dict:
    file = results_file(path)
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read results '{file}': {error}") from None
    if not isinstance(payload, dict) or payload.get("command") not in ("eval", "run", "train"):
        raise UserError(f"'{file}' is not a massquant eval, train or run result (no 'command': eval|train|run)")
    problem = _shape_problem(payload)
    if problem:
        raise UserError(f"'{file}' is not a result file massquant can read: {problem}")
    return payload


def _shape_problem(payload: dict) -> str | None:
    """What in a results file does not have the shape massquant writes (a hand-edited or foreign JSON)."""
    rows = payload.get("rows")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        return "'rows' is not a list of objects"
    for section in ("model", "data", "eval_data", "view"):
        if payload.get(section) is not None and not isinstance(payload[section], dict):
            return f"'{section}' is not an object"
    if payload["command"] == "run" and payload.get("view") is not None:
        view = payload["view"]
        if set(view) - {"rows", "cols", "value"} or not isinstance(view.get("rows", []), list):
            return "'view' is not a table view (rows, cols, value)"
    for index, row in enumerate(rows):
        if not isinstance(row.get("config", ""), str):
            return f"row {index}: 'config' is not a string"
        for name in ("ppl", "mean_nll", "delta_ppl"):
            if row.get(name) is not None and (isinstance(row[name], bool) or not isinstance(row[name], (int, float))):
                return f"row {index}: '{name}' is not a number"
        tasks = row.get("tasks")
        if tasks is not None and not (
            isinstance(tasks, dict) and all(
                isinstance(entry, dict) and isinstance(entry.get("metrics"), dict)
                and all(isinstance(score, dict) and "value" in score for score in entry["metrics"].values())
                for entry in tasks.values()
            )
        ):
            return f"row {index}: 'tasks' is not a mapping of task -> metrics -> value"
        outliers = row.get("outliers")
        if outliers and not (isinstance(outliers, dict) and {"max_abs", "mean_kurtosis"} <= set(outliers)):
            return f"row {index}: 'outliers' lacks max_abs and mean_kurtosis"
    return None


def task_metrics(row: dict) -> dict[str, float]:
    """lm-eval scores of a row as flat ``task:metric`` values (e.g. ``massquant_arc_easy:acc``)."""
    return {
        f"{name}:{metric}": score["value"]
        for name, entry in (row.get("tasks") or {}).items()
        for metric, score in entry["metrics"].items()
    }


def outlier_values(row: dict) -> dict[str, float]:
    """An unquantized row's outlier summary as values to tabulate: ``max_abs`` and ``kurtosis`` (mean excess)."""
    summary = row.get("outliers") or {}
    return {"max_abs": summary["max_abs"], "kurtosis": summary["mean_kurtosis"]} if summary else {}


def rows_of(payload: dict, source: str) -> list[dict]:
    rows = payload["rows"] if payload["command"] == "run" else _eval_rows(payload)
    for row in rows:  # rows are grouped and pivoted by these keys: they must be plain values
        for key in ROW_KEYS:
            if isinstance(row.get(key), (list, dict)):
                raise UserError(f"'{source}' is not a result file massquant can read: '{key}' of a row is not a plain value")
    return [{**row, **task_metrics(row), **outlier_values(row), "source": source} for row in rows]


def is_baseline(row: dict) -> bool:
    return row.get("spec") == "fp" and row.get("massive") in (None, "none") and row.get("mitigation") in (None, "none")


def metric_names(rows: list[dict]) -> list[str]:
    """Numbers that have a Δ: perplexity and whatever task metrics the rows carry."""
    names = [name for name in BASE_METRICS if any(isinstance(row.get(name), (int, float)) for row in rows)]
    return names + list(dict.fromkeys(key for row in rows for key in task_metrics(row)))


def add_deltas(rows: list[dict], task_settings: TaskSettings | None = None) -> list[dict]:
    """``delta_<metric>`` = the row's metric minus its group baseline's (the first baseline of that group).

    With ``task_settings``, task Δs also get their paired-bootstrap interval in the row's ``tasks``
    (where it is not there yet: ``massquant eval`` stores its own).
    """
    baselines: dict[tuple, dict] = {}
    for row in rows:
        if is_baseline(row):
            baselines.setdefault(tuple(row.get(key) for key in GROUP_KEYS), row)
    metrics = metric_names(rows)
    for row in rows:
        baseline = baselines.get(tuple(row.get(key) for key in GROUP_KEYS))
        for name in metrics:
            mine, theirs = row.get(name), baseline.get(name) if baseline else None
            number = isinstance(mine, (int, float)) and isinstance(theirs, (int, float))
            row[DELTA + name] = mine - theirs if number else None
        if task_settings is not None and baseline is not None and row is not baseline and row.get("tasks") and baseline.get("tasks"):
            for name, deltas in task_deltas(row["tasks"], baseline["tasks"], task_settings).items():
                for metric, record in deltas.items():
                    row["tasks"][name]["metrics"][metric].update(record)
    return rows


def distinct_measurements(rows: list[dict]) -> list[dict]:
    """Rows in order; a training run's ``before`` row met again (same model, text, spec and perplexity) is left out:
    every run of a model measures the model as loaded."""
    seen, kept = set(), []
    for row in rows:
        key = json.dumps([row.get(name) for name in (*GROUP_KEYS, *VARIANT_KEYS, "ppl")], default=str)
        if row.get("stage") == "before" and key in seen:
            continue
        seen.add(key)
        kept.append(row)
    return kept


def load_rows(paths: list[str | Path]) -> list[dict]:
    rows = [row for path in paths for row in rows_of(load_payload(path), str(path))]
    return add_deltas(distinct_measurements(rows))


@dataclass
class View:
    """A table of rows: either long (row keys + value and its Δ) or pivoted (one column per ``cols`` value).

    The same fields are a recipe's ``table`` and ``massquant compare``'s flags.
    """

    rows: list[str] = field(default_factory=list)  # empty: the identifying keys that vary
    cols: str | None = None  # one key whose values become columns; None: a long table
    value: str = "ppl"  # with cols: the pivoted value; a long table adds its Δ


def varying_keys(rows: list[dict], candidates) -> list[str]:
    return [key for key in candidates if len({json.dumps(row.get(key)) for row in rows}) > 1]


def check_layout_keys(row_keys: list[str], col_key: str | None, where: str = "") -> None:
    for key in [*row_keys, *([col_key] if col_key else [])]:
        if key not in ROW_KEYS:
            raise UserError(f"{where}unknown row/column key '{key}'; accepted: {', '.join(ROW_KEYS)}")


def resolve_view(rows: list[dict], row_keys: list[str] | None, col_key: str | None, value: str | None) -> View:
    """Fill what was not asked for: rows = the identifying keys that vary (config for a long table)."""
    if not rows:
        raise UserError("no result rows to show")
    check_layout_keys(row_keys or [], col_key)
    known = list(dict.fromkeys(key for row in rows for key in row))
    value = value or "ppl"
    numeric = [key for key in known if any(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool) for row in rows)]
    if value not in numeric:
        raise UserError(f"unknown value '{value}'; accepted: {', '.join(numeric)}")
    if not row_keys:
        if col_key:
            # nothing else varies: one row, labelled by the model
            row_keys = [key for key in varying_keys(rows, GROUP_KEYS + VARIANT_KEYS) if key != col_key] or ["model"]
        else:
            row_keys = varying_keys(rows, GROUP_KEYS) + ["config"]
    return View(list(row_keys), col_key, value)


def delta_name(value: str) -> str:
    return value if value.startswith(DELTA) else DELTA + value


def table(rows: list[dict], view: View) -> tuple[list[dict], dict[str, str], set[str]]:
    """Rows, columns (key -> header) and the signed (Δ) column keys of ``view``."""
    if view.cols:
        table_rows, columns = pivot(rows, view.rows, view.cols, view.value)
        signed = {key for key in columns if key not in view.rows} if view.value.startswith(DELTA) else set()
        return table_rows, columns, signed
    values = [view.value] + ([delta_name(view.value)] if not view.value.startswith(DELTA) and delta_name(view.value) in rows[0] else [])
    columns = {key: key for key in view.rows} | {key: header(key) for key in values}
    return rows, columns, {key for key in values if key.startswith(DELTA)}


def chart_table(rows: list[dict], view: View) -> tuple[list[dict], dict[str, str]]:
    """The same view with Δ values: what the PNG chart draws."""
    delta_view = View(view.rows, view.cols, delta_name(view.value))
    if delta_view.value not in rows[0]:
        raise UserError(f"'{view.value}' has no Δ against a baseline; chart a metric ({', '.join(metric_names(rows))})")
    table_rows, columns, _ = table(rows, delta_view)
    if not view.cols:
        columns = {key: label for key, label in columns.items() if key in view.rows or key == delta_view.value}
    return table_rows, columns

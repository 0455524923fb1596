"""One self-contained HTML page from saved results of any massquant command (``massquant report``).

Each results file becomes a section; its kind is read from its content (the ``command`` every results.json
records: eval, run, train, errors, locate, intervene), and a ``compare --out`` directory is recognised by its
``compare.csv``. A section has blocks (tables and figures) and a provenance block. Figures are PNGs embedded as
``data:`` URIs and the page has no script, stylesheet or font from elsewhere, so it opens offline as one file.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import jinja2

from massquant.errors import UserError
from massquant.massive.plots import load_activations, locate_figures
from massquant.reporting.columns import (
    ERRORS_COLUMNS, INTERVENE_COLUMNS, PHENOMENON_COLUMNS, SUPER_WEIGHT_COLUMNS, training_line, worst_rows,
)
from massquant.reporting.charts import delta_bars, interval_chart, sqnr_chart, training_curves
from massquant.reporting.compare import add_deltas, distinct_measurements, is_baseline, resolve_view, rows_of
from massquant.reporting.figures import png_data_uri, scaled_colour
from massquant.reporting.results import write_atomic
from massquant.reporting.tables import TASK_COLUMNS, format_cell, format_delta, pivot, ppl_with_delta, row_notes, task_table_rows

RESULTS_FILE, COMPARE_FILE = "results.json", "compare.csv"
ROW_COMMANDS = ("eval", "run", "train")  # results whose rows compare.rows_of reads
KINDS = (*ROW_COMMANDS, "errors", "locate", "intervene", "compare")  # also the order of the page's sections
GRID_RATIO_RED = 2.0  # a grid cell is fully red when its perplexity is this multiple of the baseline's
SHOWN_LAYERS = 15  # of the errors table (worst first); the chart has every layer
SHOWN_GROUPS = 10  # of locate's massive (channel, token) groups


@dataclass
class Cell:
    text: str
    style: str = ""  # inline CSS: a grid cell's colour
    title: str = ""  # tooltip: the full number behind a rounded one
    kind: str = "number"  # "text" cells may wrap


@dataclass
class Table:
    caption: str
    headers: list[str]
    rows: list[list[Cell]]


@dataclass
class Figure:
    caption: str
    uri: str


@dataclass
class Block:
    key: str  # grid, ppl, tasks, training, errors, locate, attention, intervene, compare
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Section:
    kind: str
    title: str
    source: str
    blocks: list[Block]
    provenance: list[tuple[str, str]]
    anchor: str = ""


# ---- finding and reading results ---------------------------------------------------------------------


def find_sources(paths: list[str | Path]) -> list[Path]:
    """Every results.json and compare.csv named by ``paths`` (files, or directories searched recursively), once each."""
    found: list[Path] = []
    for given in map(Path, paths):
        if not given.exists():
            raise UserError(f"no such file or directory: '{given}' (expected a results directory, a results.json or a compare.csv)")
        if given.is_file():
            if given.name != COMPARE_FILE and given.suffix != ".json":
                raise UserError(f"'{given}' is not a results file; expected a results.json, a compare.csv or a directory holding them")
            candidates = [given]
        else:
            candidates = sorted([*given.rglob(RESULTS_FILE), *given.rglob(COMPARE_FILE)])
            if not candidates:
                raise UserError(
                    f"no massquant results under '{given}': expected a results.json (--out of eval, run, train, errors, "
                    "locate, intervene) or a compare.csv (compare --out)"
                )
        found += [candidate for candidate in candidates if candidate.resolve() not in {path.resolve() for path in found}]
    return found


def read_payload(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read results '{path}': {error}") from None
    command = payload.get("command") if isinstance(payload, dict) else None
    if command not in KINDS:
        raise UserError(f"'{path}' is not a massquant result (its 'command' is {command!r}; accepted: {', '.join(KINDS[:-1])})")
    return payload


# ---- shared pieces -----------------------------------------------------------------------------------


def _cells(values) -> list[Cell]:
    return [
        value if isinstance(value, Cell) else Cell(format_cell(value), kind="number" if isinstance(value, (int, float)) else "text")
        for value in values
    ]


def _table(caption: str, columns: dict[str, str], rows: list[dict], signed=()) -> Table:
    """``columns`` maps a row key to its header, as ``tables.render`` takes them; ``signed`` keys print +/-."""
    return Table(caption, list(columns.values()), [
        _cells([Cell(format_delta(row.get(key))) if key in signed else row.get(key) for key in columns]) for row in rows
    ])


def _figure(caption: str, figure) -> Figure:
    return Figure(caption, png_data_uri(figure))


def _versions(environment: dict | None) -> str:
    environment = environment or {}
    versions = ", ".join(f"{name} {version}" for name, version in (environment.get("versions") or {}).items() if version)
    python = environment.get("python")
    return versions + (f"; Python {python}" if python else "") + (f"; {environment['platform']}" if environment.get("platform") else "")


def provenance(payload: dict, source: Path) -> list[tuple[str, str]]:
    """What the results were computed from: command line (when recorded), model and its weight hash, text and its
    hash, settings, seed, versions, the file itself."""
    environment = payload.get("environment") or {}
    lines = [("file", str(source))]
    if environment.get("command_line"):
        lines.append(("command line", environment["command_line"]))
    model = payload.get("model")
    if model:
        lines.append(("model", f"{model.get('reference')} ({model.get('source')}); weights {model.get('fingerprint')}"))
    elif payload["command"] == "run":
        models = dict.fromkeys(f"{row.get('model')}; weights {row.get('model_fingerprint')}" for row in payload["rows"])
        lines += [("model", text) for text in models]
        lines.append(("recipe", f"{payload['recipe']['name']} ({payload['recipe']['path']})"))
    for label, data in (("text", payload.get("data")), ("evaluation text", payload.get("eval_data"))):
        if data:
            settings = ", ".join(f"{key} {value}" for key, value in data.items() if key not in ("data", "text_fingerprint", "specs") and value is not None)
            fingerprint = f"; text {data['text_fingerprint']}" if data.get("text_fingerprint") else ""
            lines.append((label, f"{data.get('data')}{fingerprint} ({settings})"))
    if payload.get("training"):
        lines.append(("training text", f"{payload['recipe']['train']['data']}; text {payload['training']['text_fingerprint']}"))
    if payload.get("calibration"):
        lines.append(("calibration", ", ".join(f"{key} {value}" for key, value in payload["calibration"].items())))
    if payload.get("seed") is not None:
        lines.append(("seed", str(payload["seed"])))
    lines.append(("versions", _versions(environment)))
    return lines


# ---- eval, run, train: rows of measurements ------------------------------------------------------------


def _label(row: dict) -> str:
    return row["config"] + (f" [{row['stage']}]" if row.get("stage") else "")


def grid_block(rows: list[dict]) -> Block | None:
    """Rows = the variant keys that vary (mitigation, massive policy, stage, ...), columns = spec, cells = perplexity
    (Δ against the baseline), coloured by the perplexity ratio to the baseline on a fixed scale."""
    measured = [row for row in rows if isinstance(row.get("ppl"), (int, float))]
    if len({row.get("spec") for row in measured}) < 2:
        return None
    view = resolve_view(measured, None, "spec", "ppl")
    try:
        table, columns = pivot([{**row, "index": index} for index, row in enumerate(measured)], view.rows, "spec", "index")
    except UserError as error:
        return Block("grid", "Mitigation × quantization grid", notes=[f"no grid: {error}"])
    baselines = [row["ppl"] for row in measured if is_baseline(row)]
    base = baselines[0] if len(baselines) == 1 else None  # named in the note when there is one
    lines = []
    for line in table:
        cells = [Cell(str(line[key]), kind="text") for key in view.rows]
        for key in columns:
            if key in view.rows:
                continue
            row = measured[line[key]] if line.get(key) is not None else None
            cells.append(_grid_cell(row))
        unquantized = next((measured[line[key]] for key in columns if key == "spec=fp" and line.get(key) is not None), None)
        outliers = (unquantized or {}).get("outliers") or {}
        cells += _cells([outliers.get("max_abs"), outliers.get("mean_kurtosis")])
        lines.append(cells)
    headers = [columns[key] for key in columns] + ["max |a| (unquantized)", "mean kurtosis (unquantized)"]
    notes = [
        f"Cells: perplexity (Δ against the unquantized, unmitigated baseline{f', {format_cell(base)}' if base is not None else ''}). "
        f"Colour: perplexity ÷ baseline on a log scale, green = 1 (free), yellow = {math.sqrt(GRID_RATIO_RED):.2f}, "
        f"red = {GRID_RATIO_RED:g} or more. The last two columns: the largest |activation| and the mean excess "
        "kurtosis of the unquantized row's residual stream (measured when mitigations are compared)."
    ]
    return Block("grid", "Mitigation × quantization grid", notes=notes, tables=[Table("perplexity by variant and spec", headers, lines)])


def _grid_cell(row: dict | None) -> Cell:
    """A grid cell coloured by the row's perplexity ÷ its own group's baseline (``ppl - delta_ppl``)."""
    if row is None:
        return Cell("")
    text = ppl_with_delta(row) or ""
    ppl, delta = row.get("ppl"), row.get("delta_ppl")
    if not isinstance(ppl, (int, float)) or not isinstance(delta, (int, float)) or not math.isfinite(ppl) or ppl - delta <= 0:
        return Cell(text, title=row["config"])
    background, foreground = scaled_colour(max(math.log(max(ppl, 1e-300) / (ppl - delta)), 0.0) / math.log(GRID_RATIO_RED))
    return Cell(text, style=f"background:{background};color:{foreground}", title=f"{row['config']}: {ppl!r}")


def ppl_block(rows: list[dict]) -> Block | None:
    """Every row with a perplexity: the long table and the Δ bar chart."""
    measured = [{**row, "label": _label(row), "notes": row_notes(row)} for row in rows if isinstance(row.get("ppl"), (int, float))]
    if not measured:
        return None
    columns = {"label": "config", "ppl": "perplexity", "delta_ppl": "Δppl", "tokens": "tokens", "windows": "windows", "notes": "notes"}
    figure = delta_bars(measured, {"label": "config", "delta_ppl": "Δppl"}, ["label"], "Δ perplexity against the baseline (perplexity units)")
    return Block("ppl", "Perplexity", tables=[_table("perplexity and Δ per configuration", columns, measured, signed=("delta_ppl",))],
                 figures=[_figure("Δ perplexity per configuration (0 = the baseline)", figure)])


def tasks_block(rows: list[dict], confidence: float | None) -> Block | None:
    """lm-eval scores per configuration x task x metric with the paired-bootstrap interval of each Δ (``confidence``:
    the interval's level where the results record it)."""
    lines = task_table_rows([{**row, "config": _label(row)} for row in rows if row.get("tasks")])
    if not lines:
        return None
    level = f"{confidence:.0%} " if confidence else ""
    table = _table(f"lm-eval scores, Δ against the baseline and its {level}paired-bootstrap interval (* : excludes 0)", TASK_COLUMNS, lines)
    entries = [
        {"label": f"{_label(row)} · {name} {metric}", "colour_key": row["config"], **score}
        for row in rows
        for name, entry in (row.get("tasks") or {}).items()
        for metric, score in entry["metrics"].items()
        if score.get("delta") is not None
    ]
    figures = [_figure("Δ of each task metric with its paired-bootstrap interval", interval_chart(entries, "Δ against the baseline (metric units)"))] if entries else []
    return Block("tasks", "Downstream tasks", tables=[table], figures=figures)


def training_block(payload: dict) -> Block:
    training = payload["training"]
    notes = [training_line(payload)]
    stages = [{"stage": stage, **summary} for stage, summary in (payload.get("massive") or {}).items()]
    columns = {"stage": "stage", "max_abs": "max |a|", "max_abs_layer": "at layer", "mean_kurtosis": "mean kurtosis", "massive_values": "massive values"}
    tables = [_table("outliers of the unquantized model at each stage", columns, stages)] if stages else []
    return Block("training", "Training", notes=notes, tables=tables, figures=[_figure("loss, learning rate and gradient norm per step", training_curves(training["history"]))])


def rows_section(payload: dict, source: Path) -> list[Block]:
    rows = add_deltas(distinct_measurements(rows_of(payload, str(source))))
    blocks = [grid_block(rows), ppl_block(rows), tasks_block(rows, (payload.get("tasks") or {}).get("confidence"))]
    if payload["command"] == "train" and payload.get("training"):
        blocks.append(training_block(payload))
    return [block for block in blocks if block is not None]


# ---- errors, locate, intervene, compare ----------------------------------------------------------------


def errors_section(payload: dict, source: Path) -> list[Block]:
    rows = payload["rows"]
    worst = worst_rows(rows, SHOWN_LAYERS)
    return [Block(
        "errors", f"Per-layer quantization error ({payload['spec']})",
        tables=[_table(f"the {len(worst)} layers with the largest relative output error ‖Yq − Y‖/‖Y‖ (of {len(rows)})", ERRORS_COLUMNS, worst)],
        figures=[_figure("weight and activation SQNR per layer and projection", sqnr_chart(rows, payload["spec"]))],
    )]


def locate_section(payload: dict, source: Path) -> list[Block]:
    summary, criteria = payload["summary"], payload["config"]["criteria"]
    notes = [
        f"Massive: |a| > {criteria['abs_threshold']:g} and > {criteria['median_ratio']:g} × the layer's median |a|. "
        f"{summary['massive_values']} massive values; first massive layer {summary['first_massive_layer']}; "
        f"largest |a| {format_cell(summary['max_abs'])} at layer {summary['max_abs_layer']}; {summary['super_weights']} super weights "
        f"({payload['sequences']} sequences of {payload['seq_len']} tokens)."
    ]
    activations = None
    saved = payload.get("activations")
    if saved and (source.parent / saved["file"]).is_file():
        values, tokens = load_activations(source.parent / saved["file"])
        activations = (saved["layer"], values, tokens)
    else:
        notes.append("No saved activations beside this result (locate --out writes activations-layer-N.npz): no heat map or 3-D plot.")
    captions = {
        "magnitudes.png": "top-1/2/3 and median |activation| per layer (Sun et al. 2024, fig. 2)",
        "magnitudes-3d": "|activation| of one layer, tokens × channels (Sun et al. 2024, fig. 1)",
        "heatmap": "the same layer as a heat map, log colour scale",
        "attention-sink.png": "attention share on the first token per layer and head",
        "outliers.png": "excess kurtosis, token norms and matrix entropy per layer",
    }
    figures = [
        _figure(next(text for prefix, text in captions.items() if name.startswith(prefix)), figure)
        for name, figure in locate_figures(payload, activations).items()
    ]
    phenomena = payload.get("phenomena", [])[:SHOWN_GROUPS]
    weights = payload["massive"]["super_weights"]
    tables = [_table("massive activations as phenomena (the largest)", PHENOMENON_COLUMNS, phenomena)] if phenomena else []
    tables += [_table("super weights (down_proj weight[row, col])", SUPER_WEIGHT_COLUMNS, weights)] if weights else []
    return [Block("locate", "Massive activations", notes=notes, tables=tables, figures=figures)]


def intervene_section(payload: dict, source: Path) -> list[Block]:
    rows = [{**row, "delta_ppl_text": format_delta(row["delta_ppl"])} for row in payload["rows"]]
    figure = delta_bars(rows, {"intervention": "intervention", "delta_ppl": "Δppl"}, ["intervention"], "Δ perplexity against the unchanged model (perplexity units)")
    return [Block(
        "intervene", "Interventions on massive activations",
        notes=[f"Detection: {payload['detection']}; located on the calibration text: {payload['located']['sites']} sites, first layer {payload['located']['first_layer']}."],
        tables=[_table("perplexity with the massive activations changed", INTERVENE_COLUMNS, rows)],
        figures=[_figure("Δ perplexity per intervention", figure)],
    )]


def compare_section(source: Path) -> list[Block]:
    """A ``massquant compare --out`` directory: its CSV table and, when written, its chart."""
    with source.open(encoding="utf-8", newline="") as handle:
        lines = list(csv.reader(handle))
    if not lines:
        raise UserError(f"'{source}' is empty; expected the table massquant compare --out writes")
    table = Table("the compared table", lines[0], [_cells(_number_or_text(value) for value in line) for line in lines[1:]])
    chart = source.parent / "compare.png"
    figures = [Figure("Δ per configuration", png_data_uri(chart.read_bytes()))] if chart.is_file() else []
    return [Block("compare", "Compared results", tables=[table], figures=figures)]


def _number_or_text(text: str):
    try:
        return float(text)
    except ValueError:
        return text


BUILDERS = {"errors": errors_section, "locate": locate_section, "intervene": intervene_section, **{name: rows_section for name in ROW_COMMANDS}}
TITLES = {
    "eval": "Evaluation", "run": "Recipe run", "train": "Training run", "errors": "Layer errors",
    "locate": "Locate", "intervene": "Interventions", "compare": "Comparison",
}


def build_section(source: Path) -> Section:
    """The section of one results.json or compare.csv; UserError when the file is not a complete massquant result."""
    if source.name == COMPARE_FILE:
        return Section("compare", TITLES["compare"], str(source.parent), compare_section(source), [("file", str(source))])
    payload = read_payload(source)
    kind = payload["command"]
    model = (payload.get("model") or {}).get("reference") or (payload.get("recipe") or {}).get("name") or ""
    try:
        return Section(kind, f"{TITLES[kind]}: {model}" if model else TITLES[kind], str(source.parent), BUILDERS[kind](payload, source), provenance(payload, source))
    except (KeyError, IndexError, TypeError) as error:  # a hand-edited or truncated file: name it, no traceback
        raise UserError(f"'{source}' is not a complete massquant {kind} result ({type(error).__name__}: {error})") from None


def render_report(sections: list[Section], title: str) -> str:
    """The page (HTML text) of ``sections``, through the package's Jinja2 template with autoescaping."""
    environment = jinja2.Environment(loader=jinja2.PackageLoader("massquant.reporting", "templates"), autoescape=True, undefined=jinja2.StrictUndefined)
    for number, section in enumerate(sections, start=1):
        section.anchor = f"s{number}-{section.kind}"
    return environment.get_template("report.html.j2").render(title=title, sections=sections, version=metadata.version("massquant"))


def write_report(paths: list[str | Path], out: str | Path, title: str = "massquant report") -> Path:
    """Read every result under ``paths``, render the page and write it to ``out`` atomically.

    Raises UserError for a path without results, an unreadable or foreign results file, or an unwritable ``out``.
    """
    # the grids first, then where the errors are, then why (massive activations), as a reader asks
    sections = sorted((build_section(source) for source in find_sources(paths)), key=lambda section: KINDS.index(section.kind))
    html = render_report(sections, title)
    try:
        return write_atomic(out, html)
    except OSError as error:
        raise UserError(f"cannot write the report '{out}': {error.strerror}") from None

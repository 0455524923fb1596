"""massquant compare: tables and a Δ chart from saved results, without recomputing anything."""

from __future__ import annotations

import sys

from massquant.errors import UserError
from massquant.reporting.charts import delta_bars
from massquant.reporting.figures import save_png
from massquant.reporting.compare import (
    ROW_KEYS, View, chart_table, delta_name, header, load_payload, load_rows, resolve_view, table,
)
from massquant.reporting.results import ensure_writable_dir, writing
from massquant.reporting.tables import TABLE_FORMATS, render

NAME = "compare"
HELP = "re-render saved results (run directories, eval results.json) as tables, CSV, LaTeX and a Δ chart"
FILES = {"markdown": "compare.md", "csv": "compare.csv", "latex": "compare.tex"}


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a 'massquant run' directory, an eval --out directory, or a results.json")
    parser.add_argument("--rows", metavar="KEY[,KEY]", help=f"row keys ({', '.join(ROW_KEYS)}); default: the keys that vary")
    parser.add_argument("--cols", metavar="KEY", help="one key whose values become columns (e.g. spec); default: a long table")
    parser.add_argument(
        "--value", metavar="NAME",
        help="what the cells show: ppl (default), delta_ppl, mean_nll, or a task metric and its delta_ form",
    )
    parser.add_argument("--table-format", default="github", choices=TABLE_FORMATS, help="format of the printed table (default: github)")
    parser.add_argument("--out", metavar="DIR", help="also write compare.md, compare.csv, compare.tex and compare.png (Δ per configuration)")


def _recorded_view(args) -> View | None:
    """With one run directory and no view flags, the view its recipe asked for."""
    if len(args.paths) != 1 or args.rows or args.cols or args.value:
        return None
    payload = load_payload(args.paths[0])
    return View(**payload["view"]) if payload["command"] == "run" and payload.get("view") else None


def run(args) -> int:
    directory = ensure_writable_dir(args.out) if args.out else None
    rows = load_rows(args.paths)
    asked = _recorded_view(args) or View([key.strip() for key in (args.rows or "").split(",") if key.strip()], args.cols, args.value)
    view = resolve_view(rows, asked.rows, asked.cols, asked.value)
    table_rows, columns, signed = table(rows, view)
    print(render(table_rows, columns, args.table_format, signed))
    if directory:
        for table_format, name in FILES.items():
            with writing(directory / name) as path:
                path.write_text(render(table_rows, columns, table_format, signed) + "\n", encoding="utf-8")
        written = [directory / name for name in FILES.values()]
        try:
            chart_rows, chart_columns = chart_table(rows, view)
        except UserError as error:
            print(f"massquant: no chart: {error}", file=sys.stderr)
        else:
            figure = delta_bars(chart_rows, chart_columns, view.rows, header(delta_name(view.value)))
            written.append(save_png(figure, directory / "compare.png"))
        print(f"\nwritten: {', '.join(map(str, written))}", file=sys.stderr)
    return 0

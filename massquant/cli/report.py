"""massquant report: one self-contained HTML page from saved results of any command."""

from __future__ import annotations

import sys
from pathlib import Path

from massquant.errors import UserError
from massquant.reporting.report import write_report
from massquant.reporting.results import ensure_writable_dir

NAME = "report"
HELP = "one self-contained HTML page (tables, plots, provenance) from saved results of eval, run, train, errors, locate, intervene, compare"


def add_arguments(parser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="DIR",
        help="result directories (searched recursively for results.json and compare.csv), or such files",
    )
    parser.add_argument("--out", metavar="FILE", default="report.html", help="the HTML file to write (default: report.html)")
    parser.add_argument("--title", default="massquant report", help="the page's title (default: massquant report)")


def run(args) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory; name the HTML file to write, e.g. {out / 'report.html'}")
    ensure_writable_dir(out.parent)  # checked before anything is read
    written = write_report(args.paths, out, args.title)
    print(f"report: {written} ({written.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)
    return 0

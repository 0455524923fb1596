"""massquant mitigations: the registry, as a table."""

from __future__ import annotations

from massquant.mitigations import format_value, registry
from massquant.reporting.results import to_json
from massquant.reporting.columns import MITIGATION_COLUMNS
from massquant.reporting.tables import TABLE_FORMATS, render

NAME = "mitigations"
HELP = "list the mitigations --mitigation accepts, with their parameters"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the registry as JSON")
    parser.add_argument("--table-format", default="github", choices=TABLE_FORMATS, help="tabulate format (default: github)")


def run(args) -> int:
    entries = [
        {
            "name": entry.name,
            "kind": entry.kind,
            "parameters": ", ".join(f"{key}={format_value(value)}" for key, value in entry.parameters.items()),
            "architectures": f"{', '.join(entry.architectures)} (needs {', '.join(entry.requires)})" if entry.requires else "all",
            "description": entry.description + (" (needs calibration)" if entry.needs_calibration else ""),
        }
        for entry in registry().values()
    ]
    print(to_json(entries) if args.json else render(entries, MITIGATION_COLUMNS, args.table_format))
    return 0

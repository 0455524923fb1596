"""massquant run RECIPE: every cell of an evaluation grid, each saved as it finishes; a rerun resumes."""

from __future__ import annotations

import sys
from pathlib import Path

from massquant import options
from massquant.errors import UserError
from massquant.recipes.execute import Executor, flat_row, run_cells
from massquant.recipes.schema import expand, load_recipe, with_overrides
from massquant.reporting.compare import add_deltas, resolve_view, table
from massquant.reporting.results import ensure_writable_dir, environment, to_json, write_json_atomic
from massquant.reporting.tables import TABLE_FORMATS, render

NAME = "run"
HELP = "run an evaluation recipe (recipes/*.yaml): every cell cached, an interrupted run resumes"


def add_arguments(parser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="a recipe file with 'kind: grid' (see recipes/)")
    parser.add_argument("--out", metavar="DIR", help="run directory: cells/, results.json (default: results/<recipe name>)")
    # Overrides: the same grid on other models or a smaller slice of text (repeat --model/--data/--seq-len for several).
    options.add_arguments(parser, "model", "text", only=("model", "data", "seq_len", "max_tokens"), axes=True)
    parser.add_argument("--recompute", action="store_true", help="compute every cell again, ignoring cached ones")
    parser.add_argument(
        "--executor", choices=("local", "ray"), default="local",
        help="where cells are computed: this process (default), or a Ray cluster (pip install 'massquant[ray]'); "
        "each Ray worker asks for the recipe's 'resources' and the run directory must be shared by every node",
    )
    parser.add_argument("--address", metavar="ADDR", help="--executor ray: the cluster to join ('auto', 'ray://HOST:10001'; default: start a local one)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the results JSON to stdout instead of the table")
    output.add_argument("--table-format", default="github", choices=TABLE_FORMATS, help="format of the printed table (default: github)")


def run(args) -> int:
    recipe_path = Path(args.recipe)
    recipe = load_recipe(recipe_path)
    overrides = {"model": args.model, "data": args.data, "seq_len": args.seq_len, "max_tokens": args.max_tokens}
    recipe = with_overrides(recipe, **overrides)
    if args.address and args.executor != "ray":
        raise UserError("--address names a Ray cluster; it needs --executor ray")
    cells = expand(recipe, f"recipe '{recipe_path}'")  # every error before any model loads
    directory = ensure_writable_dir(args.out or Path("results") / recipe.name)
    view = recipe.table
    payload = {
        "command": "run",
        "recipe": {
            "path": str(recipe_path),
            "name": recipe.name,
            "description": recipe.description,
            "text": recipe_path.read_text(encoding="utf-8"),
            "overrides": {key: value for key, value in overrides.items() if value},
        },
        "view": vars(view),
        "cells": len({cell.key for cell in cells}),
        "environment": environment(),
        "rows": [],
    }

    write_errors: list[UserError] = []

    def save(records: list[dict]) -> None:
        payload["rows"] = add_deltas([flat_row(record) for record in records], cells[0].tasks)
        try:  # a full disk does not stop the run: every row is printed at the end
            write_json_atomic(directory / "results.json", payload)
        except UserError as error:
            write_errors.append(error)
        else:
            write_errors.clear()

    executor = Executor(args.executor, args.address, recipe.resources)
    outcome = run_cells(cells, directory, recipe.name, on_record=save, recompute=args.recompute, executor=executor)
    payload.update(computed=outcome.computed, reused=outcome.reused, stale=outcome.stale, not_applicable=outcome.not_applicable)
    save(outcome.records)
    error = outcome.write_error or (write_errors[0] if write_errors else None)
    stale = sum(outcome.stale.values())
    print(
        f"cells: {outcome.computed} computed, {outcome.reused} reused, {outcome.not_applicable} not applicable "
        f"({stale} recomputed because their inputs changed)" + ("" if error else f"; results: {directory / 'results.json'}"),
        file=sys.stderr,
    )
    if args.json:
        print(to_json(payload))
    else:
        rows = payload["rows"]
        table_rows, columns, signed = table(rows, resolve_view(rows, view.rows, view.cols, view.value))
        print(render(table_rows, columns, args.table_format, signed))
        for row in rows:
            if row.get("not_applicable"):
                print(f"not applicable: {row['model']} {row['config']}: {row['not_applicable']}")
    if error:
        raise UserError(f"{error} (the results are printed above)")
    return 0

"""massquant train RECIPE.yaml: fine-tune (or train from scratch) with training-time mitigations, then evaluate."""

from __future__ import annotations

import sys
from pathlib import Path

from massquant.cli import common
from massquant.reporting.results import ensure_writable_dir, to_json
from massquant.reporting.columns import TRAIN_COLUMNS, training_line
from massquant.reporting.tables import TABLE_FORMATS, render
from massquant.training.recipe import load_recipe
from massquant.training.runner import RESULTS, TrainingRun

NAME = "train"
HELP = "fine-tune a model with training-time mitigations (tvr, dyt, gated, kvbias, ...) from a recipe; checkpoint and evaluate it"


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="a training recipe (YAML; see recipes/train-*.yaml)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: the recipe's 'out'): checkpoint/ and results.json")
    parser.add_argument("--json", action="store_true", help="print the results JSON to stdout instead of the table")
    parser.add_argument("--table-format", default="github", choices=TABLE_FORMATS, help="tabulate format of the printed table (default: github)")




def summary(payload: dict, table_format: str) -> str:
    rows = [
        {**row, "max_abs": located.get("max_abs"), "kurtosis": located.get("mean_kurtosis")}
        for row in payload["rows"]
        for located in [payload["massive"].get(row["stage"], {}) if row["spec"] == "fp" else {}]
    ]
    lines = [training_line(payload)]
    if "dynamics" in payload:
        from massquant.cli.analyze_dynamics import FIT_COLUMNS, STEP_COLUMNS, fit_rows, summary_row

        dynamics = payload["dynamics"]
        columns = {key: header for key, header in STEP_COLUMNS.items() if key != "checkpoint"}
        lines += ["", render([summary_row(record) for record in dynamics["records"]], columns, table_format),
                  "", f"fit of the top activation: {dynamics['fit'].get('form', '')}",
                  render(fit_rows(dynamics["fit"]), FIT_COLUMNS, table_format)]
    if rows:
        lines += ["", render(rows, TRAIN_COLUMNS, table_format, signed=("delta_ppl",))]
    return "\n".join(lines)


def run(args) -> int:
    recipe = load_recipe(args.recipe)
    if args.out:
        recipe.out = args.out
    run = TrainingRun(recipe, Path(recipe.out))
    run.check()  # the recipe against the model's config, before anything is written or loaded
    ensure_writable_dir(recipe.out)
    common.seed_everything(recipe.train.seed)
    payload = run.run()
    out = recipe.out
    if args.json:
        print(to_json(payload))
    else:
        print(summary(payload, args.table_format))
        print(f"\nresults: {Path(out) / RESULTS}", file=sys.stderr)
    return 0

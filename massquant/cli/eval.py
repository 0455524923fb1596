"""massquant eval: perplexity (and lm-eval task scores) of the full-precision baseline and each quantized configuration."""

from __future__ import annotations

import dataclasses

from massquant import options
from massquant.cli import common
from massquant.options import settings
from massquant.errors import UserError
from massquant.data.text import load_text
from massquant.evaluation.perplexity import build_windows
from massquant.evaluation.runner import OUTLIER_WINDOWS, evaluate_variants
from massquant.evaluation.tasks import TaskSuite
from massquant.validation import Plan
from massquant.models.loading import load_model, max_sequence_length
from massquant.reporting.results import environment
from massquant.reporting.columns import EVAL_COLUMNS
from massquant.reporting.tables import TASK_COLUMNS, format_delta, mitigation_grid, render, row_notes, task_table_rows

NAME = "eval"
HELP = "perplexity and lm-eval task scores of the full-precision baseline and each quantized configuration"


def add_arguments(parser) -> None:
    options.add_arguments(
        parser, "model", "text", "quantization", "calibration", "massive", "mitigation", "tasks", "run", skip=("n_seqs",),
    )
    common.add_output_arguments(parser)


def task_suite(args) -> TaskSuite | None:
    """The tasks to score, checked (names included) before the model loads; None without --tasks."""
    chosen = settings.task_settings(args)
    if chosen is None:
        if args.no_ppl or args.data == "none":
            raise UserError("without perplexity (--no-ppl or --data none) there is nothing to measure; add --tasks")
        return None
    return TaskSuite(chosen)


def run(args) -> int:
    # Everything a user can get wrong is checked before the model loads.
    sink = common.ResultSink(args)
    model_config, ppl_config = settings.model_config(args), settings.perplexity_config(args)
    ppl_config.validate()
    model_config.validate()
    grid = settings.variants(args)
    mitigated = any(variant.mitigation for variant in grid)
    tasks = task_suite(args)
    with_ppl = not args.no_ppl and ppl_config.data != "none"
    common.seed_everything(args.seed)
    text = load_text(ppl_config.data) if with_ppl else None
    if common.needs_calibration(grid):
        load_text(args.calib_data)  # a missing calibration text fails now, not after the baseline
    plan = Plan(model_config, grid)  # every configuration against the model's config and shapes, before its weights load
    loaded = load_model(model_config)
    reasons = plan.settle(loaded)
    windows = build_windows(loaded.tokenizer, text, ppl_config, max_sequence_length(loaded.model)) if with_ppl else None
    calibration = None
    if common.needs_calibration([variant for variant, reason in zip(grid, reasons) if not reason]):
        calibration = settings.calibration(args).batch(
            loaded.tokenizer, args.seed, bos=windows.bos_token_id is not None if windows else args.bos != "never",
        )
    payload = {
        "command": "eval",
        "model": loaded.record(),
        "data": windows.record(ppl_config, text) if windows else None,
        "tasks": tasks.settings.as_dict() if tasks else None,
        "calibration": dataclasses.asdict(settings.calibration(args)) if calibration is not None else None,
        "seed": args.seed,
        "environment": environment(),
        "rows": [],
    }

    def save_partial(rows):
        payload["rows"] = rows
        sink.save(payload)

    # Outliers of each unquantized row feed the mitigation grid, so they are measured only when mitigations are compared.
    rows = evaluate_variants(
        loaded, grid, windows, calibration, ppl_config.batch_size, on_row=save_partial, tasks=tasks,
        outlier_windows=OUTLIER_WINDOWS if mitigated else 0, not_applicable=reasons,
    )
    tables = []
    if windows:
        table_rows = [{**row, "delta_ppl_text": format_delta(row.get("delta_ppl")), "notes": row_notes(row)} for row in rows]
        tables.append(render(table_rows, EVAL_COLUMNS, args.table_format))
        if mitigated:
            tables.append(render(*mitigation_grid(rows), args.table_format))
    if tasks:
        columns = {**TASK_COLUMNS, "interval_text": f"{tasks.settings.confidence:.0%} paired CI of Δ"}
        tables.append(render(task_table_rows(rows), columns, args.table_format))
    sink.finish(payload, "\n\n".join(tables))
    if rows and rows[0].get("non_finite_windows"):
        raise UserError(f"the unquantized model itself produced non-finite values ({row_notes(rows[0])}); check --dtype and the weights")
    return 0

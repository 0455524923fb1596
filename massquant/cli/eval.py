"""massquant eval: perplexity (and lm-eval task scores) of the full-precision baseline and each quantized configuration."""

from __future__ import annotations

from massquant.cli import common
from massquant.errors import UserError
from massquant.data.calibration import calibration_batch
from massquant.data.text import load_text
from massquant.evaluation.perplexity import build_windows
from massquant.evaluation.runner import OUTLIER_WINDOWS, evaluate_variants
from massquant.evaluation.tasks import TaskSettings, TaskSuite
from massquant.validation import Plan
from massquant.models.loading import load_model, max_sequence_length
from massquant.reporting.results import environment
from massquant.reporting.tables import TASK_COLUMNS, format_delta, mitigation_grid, render, row_notes, task_table_rows

NAME = "eval"
HELP = "perplexity and lm-eval task scores of the full-precision baseline and each quantized configuration"
COLUMNS = {
    "config": "config",
    "ppl": "perplexity",
    "delta_ppl_text": "Δppl",
    "tokens": "tokens",
    "seconds": "seconds",
    "notes": "notes",
}


def add_arguments(parser) -> None:
    common.add_model_arguments(parser)
    common.add_data_arguments(parser)
    common.add_quantization_arguments(parser)
    common.add_variant_arguments(parser)
    add_task_arguments(parser)
    common.add_output_arguments(parser)


def add_task_arguments(parser) -> None:
    group = parser.add_argument_group(
        "downstream tasks (lm-eval)",
        "Each configuration is also scored on lm-eval tasks, in this process, with the model loaded once. "
        "Offline: massquant_arc_easy, massquant_arc_challenge, massquant_hellaswag, massquant_piqa, "
        "massquant_winogrande, massquant_boolq, massquant_openbookqa, massquant_sciq, massquant_lambada_openai, "
        "massquant_mmlu, or the group massquant_core; lm-eval's own names (hellaswag, ...) need the hub.",
    )
    group.add_argument("--tasks", action="append", default=[], metavar="TASK[,TASK]", help="lm-eval tasks or groups; repeat or comma-separate")
    group.add_argument("--limit", type=float, help="questions per task: a count, or a fraction below 1 (lm-eval's --limit; default: all)")
    group.add_argument("--num-fewshot", type=int, help="few-shot examples per question (default: each task's own, mostly 0)")
    group.add_argument("--task-batch-size", type=common.positive_int, default=1, help="lm-eval requests per forward pass (default: 1)")
    group.add_argument("--bootstrap", type=common.positive_int, default=1000, metavar="N", help="paired bootstrap resamples per task Δ (default: 1000)")
    group.add_argument("--no-ppl", action="store_true", help="skip perplexity and score only the tasks (as does --data none)")


def task_suite(args) -> TaskSuite | None:
    """The tasks to score, checked (names included) before the model loads; None without --tasks."""
    names = tuple(dict.fromkeys(name.strip() for option in args.tasks for name in option.split(",") if name.strip()))
    if not names:
        if args.no_ppl or args.data == "none":
            raise UserError("without perplexity (--no-ppl or --data none) there is nothing to measure; add --tasks")
        return None
    settings = TaskSettings(names, args.limit, args.num_fewshot, args.task_batch_size, args.bos, args.bootstrap, seed=args.seed)
    return TaskSuite(settings)


def run(args) -> int:
    # Everything a user can get wrong is checked before the model loads.
    sink = common.ResultSink(args)
    model_config, ppl_config = common.model_config(args), common.perplexity_config(args)
    ppl_config.validate()
    model_config.validate()
    specs = common.quant_specs(args)
    grid = common.variants(args, specs)
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
        calibration = calibration_batch(
            loaded.tokenizer, args.calib_data, args.calib_samples, args.calib_seq_len, args.seed,
            bos=windows.bos_token_id is not None if windows else args.bos != "never",
        )
    payload = {
        "command": "eval",
        "model": loaded.record(),
        "data": windows.record(ppl_config, text) if windows else None,
        "tasks": tasks.settings.as_dict() if tasks else None,
        "calibration": {"data": args.calib_data, "samples": args.calib_samples, "seq_len": args.calib_seq_len} if calibration is not None else None,
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
        outlier_windows=OUTLIER_WINDOWS if args.mitigation else 0, not_applicable=reasons,
    )
    tables = []
    if windows:
        table_rows = [{**row, "delta_ppl_text": format_delta(row.get("delta_ppl")), "notes": row_notes(row)} for row in rows]
        tables.append(render(table_rows, COLUMNS, args.table_format))
        if args.mitigation:
            tables.append(render(*mitigation_grid(rows), args.table_format))
    if tasks:
        columns = {**TASK_COLUMNS, "interval_text": f"{tasks.settings.confidence:.0%} paired CI of Δ"}
        tables.append(render(task_table_rows(rows), columns, args.table_format))
    sink.finish(payload, "\n\n".join(tables))
    if rows and rows[0].get("non_finite_windows"):
        raise UserError(f"the unquantized model itself produced non-finite values ({row_notes(rows[0])}); check --dtype and the weights")
    return 0

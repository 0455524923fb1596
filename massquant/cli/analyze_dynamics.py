"""``massquant analyze dynamics CHECKPOINT...``: massive-activation statistics over a list of checkpoints
(directories, e.g. ``massquant train``'s ``checkpoint-<step>/`` with ``save_every``), and the trajectory fit."""

from __future__ import annotations

from pathlib import Path

from massquant import options
from massquant.cli import common
from massquant.errors import UserError

STEP_COLUMNS = {
    "step": "step", "checkpoint": "checkpoint", "top1": "max top-1 |a|", "top1_layer": "layer",
    "median": "median |a| there", "kurtosis": "max kurtosis", "first_token_norm": "max ‖first token‖",
    "first_token_attention": "max attention on first token",
}
FIT_COLUMNS = {"parameter": "parameter", "value": "value", "error": "std. error"}


def add_arguments(name: str, parser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="model directories in training order (step from 'checkpoint-N' or 'stepN', else the position)")
    parser.add_argument("--steps", metavar="N[,N...]", help="the checkpoints' training steps, comma-separated (default: read from the names)")
    options.add_arguments(
        parser, "model", "text", "run", only=("dtype", "device", "attn_implementation", "data", "n_seqs", "seq_len", "seed"),
        defaults={"n_seqs": 2, "seq_len": 512},
    )
    common.add_output_arguments(parser)


def summary_row(record: dict) -> dict:
    best = max(record["layers"], key=lambda row: row["top1"])
    return {
        "step": record["step"], "checkpoint": record.get("checkpoint"), "top1": best["top1"], "top1_layer": best["layer"],
        "median": best["median"], "kurtosis": max(row["kurtosis"] for row in record["layers"]),
        "first_token_norm": max(row["first_token_norm"] for row in record["layers"]),
        "first_token_attention": max(row["first_token_attention"] for row in record["layers"]),
    }


def fit_rows(fit: dict) -> list[dict]:
    if "parameters" not in fit:
        return [{"parameter": "fit", "value": fit.get("error")}]
    rows = [{"parameter": name, "value": value, "error": fit["errors"][name]} for name, value in fit["parameters"].items()]
    return rows + [{"parameter": "R²", "value": fit["r2"]}, {"parameter": "RMSE", "value": fit["rmse"]}]


def run(args) -> int:
    from massquant.analysis.dynamics import checkpoint_step, plot_dynamics, step_statistics, summarize
    from massquant.cli.analyze import tables_text, write_figures
    from massquant.models.loading import ModelConfig, load_model
    from massquant.reporting.results import environment

    missing = [path for path in args.checkpoints if not Path(path).is_dir()]
    if missing:
        raise UserError(f"checkpoint {missing[0]} is not a directory; give model directories (e.g. results/train/checkpoint-50)")
    if args.steps:
        try:
            steps = [int(step) for step in args.steps.split(",")]
        except ValueError:
            raise UserError(f"--steps expects comma-separated integers, got '{args.steps}'") from None
        if len(steps) != len(args.checkpoints):
            raise UserError(f"--steps gives {len(steps)} steps for {len(args.checkpoints)} checkpoints")
    else:
        steps = [checkpoint_step(path, index) for index, path in enumerate(args.checkpoints)]
    if steps != sorted(steps) or len(set(steps)) != len(steps):
        raise UserError(f"checkpoints must be in training order with distinct steps; read steps {steps}")
    sink = common.ResultSink(args)
    common.seed_everything(args.seed)
    records, ids = [], None
    for path, step in zip(args.checkpoints, steps):
        loaded = load_model(ModelConfig(model=path, dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation))
        if ids is None:  # the same sequences for every checkpoint
            ids = common.sampled_sequences(args, loaded, args.n_seqs, bos=loaded.tokenizer.bos_token_id is not None)
        records.append({"step": step, "checkpoint": path, "layers": step_statistics(loaded.model, ids)})
        del loaded
    payload = {"command": "analyze dynamics", "records": records, **summarize(records), "seed": args.seed,
               "data": {"data": args.data, "sequences": args.n_seqs, "seq_len": args.seq_len}, "environment": environment()}
    payload["figures"] = [str(path) for path in write_figures(sink, {"dynamics.png": plot_dynamics(records, payload)})]
    sink.finish(payload, tables_text(([summary_row(record) for record in records], STEP_COLUMNS), (fit_rows(payload["fit"]), FIT_COLUMNS),
                                     table_format=args.table_format))
    return 0

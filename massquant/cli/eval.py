"""massquant eval: perplexity of the full-precision baseline and each quantized configuration."""

from __future__ import annotations

from massquant.cli import common
from massquant.data.calibration import calibration_batch
from massquant.data.text import load_text, text_fingerprint
from massquant.evaluation.perplexity import build_windows
from massquant.evaluation.runner import evaluate_variants
from massquant.models.loading import load_model, max_sequence_length
from massquant.reporting.results import environment
from massquant.reporting.tables import format_delta, render

NAME = "eval"
HELP = "perplexity of the full-precision baseline and each quantized configuration"
COLUMNS = {
    "config": "config",
    "ppl": "perplexity",
    "delta_ppl_text": "Δppl",
    "tokens": "tokens",
    "seconds": "seconds",
}


def add_arguments(parser) -> None:
    common.add_model_arguments(parser)
    common.add_data_arguments(parser)
    common.add_quantization_arguments(parser)
    common.add_variant_arguments(parser)
    common.add_output_arguments(parser)


def run(args) -> int:
    # Everything a user can get wrong is checked before the model loads.
    sink = common.ResultSink(args)
    model_config, ppl_config = common.model_config(args), common.perplexity_config(args)
    ppl_config.validate()
    model_config.validate()
    specs = common.quant_specs(args)
    grid = common.variants(args, specs)
    common.seed_everything(args.seed)
    text = load_text(ppl_config.data)
    loaded = load_model(model_config)
    windows = build_windows(loaded.tokenizer, text, ppl_config, max_sequence_length(loaded.model))
    calibration = None
    if common.needs_calibration(grid):
        calibration = calibration_batch(
            loaded.tokenizer, args.calib_data, args.calib_samples, args.calib_seq_len, args.seed,
            bos=windows.bos_token_id is not None,
        )
    payload = {
        "command": "eval",
        "model": {"reference": model_config.model, "source": loaded.source, "fingerprint": loaded.fingerprint, **vars(model_config)},
        "data": {
            **vars(ppl_config),
            "seq_len": windows.input_ids.shape[1],
            "bos_token_id": windows.bos_token_id,
            "text_fingerprint": text_fingerprint(text),
            "text_tokens": windows.text_tokens,
        },
        "calibration": {"data": args.calib_data, "samples": args.calib_samples, "seq_len": args.calib_seq_len} if calibration is not None else None,
        "seed": args.seed,
        "environment": environment(),
        "rows": [],
    }

    def save_partial(rows):
        payload["rows"] = rows
        sink.save(payload)

    rows = evaluate_variants(loaded, grid, windows, calibration, ppl_config.batch_size, on_row=save_partial)
    table_rows = [{**row, "delta_ppl_text": format_delta(row["delta_ppl"])} for row in rows]
    sink.finish(payload, render(table_rows, COLUMNS, args.table_format))
    return 0

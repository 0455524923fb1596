"""massquant eval: perplexity of the baseline and each configuration, in one table."""

from __future__ import annotations

from massquant.cli import common
from massquant.data.text import load_text, text_fingerprint
from massquant.evaluation.perplexity import build_windows
from massquant.evaluation.runner import BASELINE, evaluate_perplexity_rows
from massquant.models.loading import load_model, max_sequence_length
from massquant.reporting.results import environment
from massquant.reporting.tables import format_delta, render

NAME = "eval"
HELP = "perplexity of the full-precision baseline and each configuration"
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
    common.add_output_arguments(parser)


def run(args) -> int:
    sink = common.ResultSink(args)
    model_config, ppl_config = common.model_config(args), common.perplexity_config(args)
    ppl_config.validate()
    model_config.validate()
    common.seed_everything(args.seed)
    text = load_text(ppl_config.data)
    loaded = load_model(model_config)
    windows = build_windows(loaded.tokenizer, text, ppl_config, max_sequence_length(loaded.model))
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
        "seed": args.seed,
        "environment": environment(),
        "rows": [],
    }

    def save_partial(rows):
        payload["rows"] = rows
        sink.save(payload)

    rows = evaluate_perplexity_rows(loaded.model, windows, [BASELINE], ppl_config.batch_size, on_row=save_partial)
    table_rows = [{**row, "delta_ppl_text": format_delta(row["delta_ppl"])} for row in rows]
    sink.finish(payload, render(table_rows, COLUMNS, args.table_format))
    return 0

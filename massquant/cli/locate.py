"""massquant locate: where a model's massive activations and super weights are, and which tokens carry them."""

from __future__ import annotations

import sys
from dataclasses import replace

from massquant import options
from massquant.cli import common
from massquant.options import settings
from massquant.errors import UserError
from massquant.evaluation.perplexity import _bos_to_prepend
from massquant.massive import MassiveCriteria
from massquant.massive.locate import locate
from massquant.massive.observers import attention_probabilities_available, layer_output
from massquant.massive.report import LocateConfig
from massquant.massive.statistics import reference_name
from massquant.massive.phenomena import describe_blind_spots, merge_runs
from massquant.massive.plots import save_activations, write_plots
from massquant.models.architectures import decoder_layers
from massquant.models.loading import load_model
from massquant.validation import model_facts
from massquant.reporting.results import environment
from massquant.reporting.columns import BLIND_SPOT_COLUMNS, LAYER_COLUMNS, PHENOMENON_COLUMNS, SUPER_WEIGHT_COLUMNS, TOKEN_COLUMNS
from massquant.reporting.tables import render

NAME = "locate"
HELP = "find massive activations and super weights: layers, channels, tokens, values; per-layer outlier statistics and plots"

SHOWN_ROWS = 20  # of the phenomena, blind-spot and token tables; the JSON has every row


def add_arguments(parser) -> None:
    options.add_arguments(
        parser, "model", "text", "massive", "locate", "run",
        only=("model", "dtype", "device", "trust_remote_code", "attn_implementation", "data", "n_seqs", "seq_len", "bos",
              "massive_threshold", "massive_ratio", "criterion", "k", "top_k", "layer", "seed"),
        defaults={"seq_len": 512},
    )
    common.add_output_arguments(parser)


def check_layer(requested: int | None, model) -> None:
    layers = len(decoder_layers(model))
    if requested is not None and not 0 <= requested < layers:
        raise UserError(f"--layer {requested} does not exist; this model has layers 0..{layers - 1}")


def heatmap_layer(requested: int | None, report) -> int:
    if requested is not None:
        return requested
    if report.massive.first_layer is not None:
        return report.massive.first_layer
    return max(report.layers, key=lambda stats: abs(stats.top[0].value)).layer


def _quoted(token: str | None) -> str:
    return "" if token is None else repr(token)


def _where(peak) -> str:
    return f"{peak.position} {_quoted(peak.token)} / {peak.channel}"


def _layer_span(run: list[dict]) -> str:
    return str(run[0]["layer"]) if len(run) == 1 else f"{run[0]['layer']}–{run[-1]['layer']}"


def _shown(rows: list[dict], columns: dict, table_format: str, what: str, empty: str) -> list[str]:
    """A table of the first SHOWN_ROWS rows, and a line saying how many more the JSON has."""
    if not rows:
        return [empty]
    more = [f"... {len(rows) - SHOWN_ROWS} more {what} in the JSON"] if len(rows) > SHOWN_ROWS else []
    return [render(rows[:SHOWN_ROWS], columns, table_format), *more]


def tables(report, payload: dict, table_format: str) -> str:
    heading = f"Massive activations as phenomena ({report.config.criteria.describe()}; x median: ratio to the layer's median |a|)"
    sections = [heading, *_shown(payload["phenomena"], PHENOMENON_COLUMNS, table_format, "phenomena", "none found")]
    sections += ["", "Blind spots of the criterion, per layer (cutoffs differ between layers; typical: the median layer's)"]
    runs = [
        {"layers": _layer_span(run), "kind": run[0]["kind"], "text": describe_blind_spots(run, reference_name(report.config.criteria))}
        for run in merge_runs(report.blind_spots)
    ]
    sections += _shown(runs, BLIND_SPOT_COLUMNS, table_format, "runs of blind spots", "none")
    layer_rows = [
        {
            "layer": stats.layer,
            "top": abs(stats.top[0].value),
            "where": _where(stats.top[0]),
            "median": stats.median,
            "cutoff": stats.cutoff,
            "ratio": stats.top[0].ratio,
            "massive": stats.massive,
            "kurtosis": stats.kurtosis,
            "first_token_norm": stats.first_token_norm,
            "token_norm": stats.token_norm,
            "entropy": stats.entropy,
            "down_proj_top": abs(stats.down_proj_top[0].value),
        }
        for stats in report.layers
    ]
    sections += ["", "Per layer (decoder layer outputs; kurtosis: excess, pooled; entropy: Rényi-2 of the tokens' Gram spectrum, nats)",
                 render(layer_rows, LAYER_COLUMNS, table_format)]
    sections += ["", "Super weights (Yu et al. 2024: down_proj weight[row, col] behind a massive output spike)"]
    weights = payload["massive"]["super_weights"]
    sections.append(render(weights, SUPER_WEIGHT_COLUMNS, table_format) if weights else "none found")
    sections += ["", f"Tokens carrying massive activations ({report.sequences} sequences of {report.seq_len} tokens)"]
    token_rows = [{**count, "token_text": _quoted(count["token"])} for count in payload["tokens"]]
    sections += _shown(token_rows, TOKEN_COLUMNS, table_format, "tokens", "none")
    return "\n".join(sections)


def run(args) -> int:
    # Everything a user can get wrong is checked before the model loads.
    sink = common.ResultSink(args)
    model_config = settings.model_config(args)
    model_config.validate()
    criteria = MassiveCriteria.named(args.criterion, args.massive_threshold, args.massive_ratio, args.k)
    config = LocateConfig(criteria=criteria, top_k=args.top_k, entropy=True).validate()
    common.seed_everything(args.seed)
    facts = model_facts(model_config)  # the layers are known before the weights load
    if facts is not None:
        check_layer(args.layer, facts.model)
    loaded = load_model(model_config)
    # The attention plot needs one more pass with eager attention, only when plots are written.
    plots = sink.directory is not None
    if plots and not attention_probabilities_available(loaded.model):
        print(f"massquant: {type(loaded.model).__name__} cannot switch to eager attention at run time; "
              "no attention-sink plot (load it with --attn-implementation eager for one)", file=sys.stderr)
    config = replace(config, attention_sink=plots and attention_probabilities_available(loaded.model))
    check_layer(args.layer, loaded.model)
    bos = _bos_to_prepend(loaded.tokenizer, args.bos) is not None
    batch = common.sampled_sequences(args, loaded, args.n_seqs, bos)
    report = locate(loaded.model, batch, config, tokenizer=loaded.tokenizer)
    layer = heatmap_layer(args.layer, report)
    payload = {
        "command": "locate",
        "model": loaded.record(),
        "data": {"data": args.data, "n_seqs": args.n_seqs, "seq_len": args.seq_len, "bos": args.bos, "bos_prepended": bos},
        "seed": args.seed,
        "environment": environment(),
        **report.as_dict(),
    }
    if plots:
        # One sequence's output of the heat-map layer is kept, so that the report can draw it again.
        tokens = [loaded.tokenizer.decode([token]) for token in batch[0].tolist()]
        values = layer_output(loaded.model, batch[0], layer).numpy()
        saved = save_activations(sink.directory, layer, values, tokens)
        payload["activations"] = {"layer": layer, "sequence": 0, "shape": list(values.shape), "file": saved.name}
        payload["plots"] = [path.name for path in write_plots(payload, sink.directory, (layer, values, tokens))]
    sink.finish(payload, tables(report, payload, args.table_format))
    return 0


"""What each command's tables show: column keys and headings, shared by the terminal tables and the HTML report."""

from __future__ import annotations

from massquant.reporting.tables import format_cell

EVAL_COLUMNS = {
    "config": "config",
    "ppl": "perplexity",
    "delta_ppl_text": "Δppl",
    "tokens": "tokens",
    "seconds": "seconds",
    "notes": "notes",
}

ERRORS_COLUMNS = {
    "layer": "layer",
    "weight_sqnr_db": "W SQNR dB",
    "act_sqnr_db": "A SQNR dB",
    "max_abs_input": "max|x|",
    "rel_output_error": "rel. out err",
}


def worst_rows(rows: list[dict], count: int) -> list[dict]:
    """The ``count`` rows with the largest relative output error; layers never reached sort last."""
    ranked = sorted(rows, key=lambda row: -1.0 if row["rel_output_error"] is None else row["rel_output_error"], reverse=True)
    return ranked[:count]


INTERVENE_COLUMNS = {
    "intervention": "intervention",
    "ppl": "perplexity",
    "delta_ppl_text": "Δppl",
    "values_changed": "values changed",
    "where": "where",
    "changed_tokens": "changed on (values)",
    "tokens": "tokens",
}

PHENOMENON_COLUMNS = {
    "name": "phenomenon",
    "value": "max value",
    "ratio": "x median",
    "values": "values",
    "carriers": "tokens",
    "sequences": "sequences",
}

BLIND_SPOT_COLUMNS = {"layers": "layers", "kind": "blind spot", "text": "what the criterion misses or lets through"}

LAYER_COLUMNS = {
    "layer": "layer",
    "top": "max |a|",
    "where": "at (position token / channel)",
    "median": "median |a|",
    "cutoff": "cutoff",
    "ratio": "x median",
    "massive": "massive",
    "kurtosis": "kurtosis",
    "first_token_norm": "‖first token‖",
    "token_norm": "‖other tokens‖",
    "entropy": "entropy",
    "down_proj_top": "down_proj max |x|",
}

SUPER_WEIGHT_COLUMNS = {
    "layer": "layer",
    "row": "row (out)",
    "col": "col (in)",
    "value": "weight",
    "input_value": "input spike",
    "output_value": "output spike",
    "position": "position",
    "contribution": "share of spike",
}

TOKEN_COLUMNS = {
    "token_text": "token",
    "token_id": "id",
    "carriers": "carriers",
    "occurrences": "occurrences",
    "at_first_position": "at position 0",
}

MITIGATION_COLUMNS = {"name": "name", "kind": "kind", "parameters": "parameters (defaults)", "architectures": "architectures", "description": "description"}

TRAIN_COLUMNS = {
    "stage": "stage",
    "config": "config",
    "ppl": "perplexity",
    "delta_ppl": "Δppl vs fp",
    "max_abs": "max|a|",
    "kurtosis": "excess kurtosis (layer mean)",
}


def training_line(payload: dict) -> str:
    """One line on what training did: steps, tokens, time, first and last loss, where the checkpoint is."""
    training = payload["training"]
    return (
        f"{payload['mitigation']} ({payload['recipe']['train'].get('optimizer', 'adamw')}): {len(training['history'])} steps of {training['tokens_per_step']} tokens in "
        f"{training['seconds']:.0f} s, loss {format_cell(training['first_loss'])} -> {format_cell(training['final_loss'])}; "
        f"checkpoint: {payload['checkpoint']}"
    )

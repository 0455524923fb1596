"""Evaluate several configurations of one loaded model on the same windows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from massquant.evaluation.perplexity import TokenWindows, perplexity

# Applies a configuration to the model in place and returns the function that undoes it.
Apply = Callable[[object], Callable[[], None]]


@dataclass
class Configuration:
    name: str
    apply: Apply | None = None  # None: the model as loaded
    details: dict = field(default_factory=dict)


BASELINE = Configuration("fp")


def evaluate_perplexity_rows(
    model, windows: TokenWindows, configurations: list[Configuration], batch_size: int = 1, on_row=None
) -> list[dict]:
    """One row per configuration, the first being the baseline every Δ refers to.

    ``on_row`` is called after each row so a caller can save partial results.
    """
    rows: list[dict] = []
    baseline_ppl = None
    for configuration in configurations:
        undo = configuration.apply(model) if configuration.apply else None
        try:
            result = perplexity(model, windows, batch_size, description=configuration.name)
        finally:
            if undo:
                undo()
        row = {"config": configuration.name, **configuration.details, **result.as_dict()}
        if baseline_ppl is None:
            baseline_ppl = result.ppl
        row["delta_ppl"] = result.ppl - baseline_ppl
        rows.append(row)
        if on_row:
            on_row(rows)
    return rows

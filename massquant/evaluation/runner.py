"""Evaluate several configurations of one loaded model on the same windows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from massquant.backends import AppliedQuantization
from massquant.evaluation.perplexity import TokenWindows, perplexity


@dataclass
class Configuration:
    """A named change to the loaded model; ``apply`` makes it and says how to undo it."""

    name: str
    apply: Callable[[], AppliedQuantization] | None = None  # None: the model as loaded
    details: dict = field(default_factory=dict)


BASELINE = Configuration("fp", details={"spec": "fp", "backend": None})


def evaluate_perplexity_rows(
    model, windows: TokenWindows, configurations: list[Configuration], batch_size: int = 1, on_row=None
) -> list[dict]:
    """One row per configuration; Δ refers to the first row, which should be the baseline.

    ``on_row(rows)`` runs after each row so a caller can save partial results.
    """
    rows: list[dict] = []
    for configuration in configurations:
        started = time.perf_counter()
        applied = configuration.apply() if configuration.apply else AppliedQuantization(model, lambda: None, {})
        setup_seconds = time.perf_counter() - started
        try:
            result = perplexity(applied.model, windows, batch_size, description=configuration.name)
        finally:
            applied.undo()
        row = {"config": configuration.name, **configuration.details, **result.as_dict()}
        row.update(setup_seconds=setup_seconds, quantization=applied.summary)
        row["delta_ppl"] = result.ppl - rows[0]["ppl"] if rows else 0.0
        rows.append(row)
        if on_row:
            on_row(rows)
    return rows

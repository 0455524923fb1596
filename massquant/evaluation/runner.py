"""Evaluate variants of one loaded model on the same windows: one result row per variant."""

from __future__ import annotations

import time

import torch

from massquant.evaluation.perplexity import TokenWindows, perplexity
from massquant.evaluation.tasks import TaskSuite, task_deltas
from massquant.massive.locate import locate
from massquant.massive.report import LocateConfig, outlier_summary
from massquant.variants import Variant, apply_variant

# Windows located per unquantized row when mitigations are compared: enough for stable maxima and kurtosis,
# a small fraction of the perplexity pass.
OUTLIER_WINDOWS = 4


def evaluate_variant(
    loaded, variant: Variant, windows: TokenWindows | None, calibration: torch.Tensor | None, batch_size: int = 1,
    tasks: TaskSuite | None = None, outlier_windows: int = 0,
) -> dict:
    """Apply ``variant``, measure it (perplexity, lm-eval tasks), undo it. The row holds everything that describes the variant.

    With ``outlier_windows``, an unquantized row also gets ``outliers``: ``locate`` on its first windows.
    """
    started = time.perf_counter()
    applied = apply_variant(loaded, variant, calibration)
    setup_seconds = time.perf_counter() - started
    row = {"config": variant.name, **variant.describe()}
    try:
        if windows is not None:
            row.update(perplexity(applied.model, windows, batch_size, description=variant.name).as_dict())
            if variant.spec is None and variant.massive.mode == "none" and outlier_windows:
                # What the mitigation did to the outliers, measured where quantization has not touched them.
                report = locate(applied.model, windows.input_ids[:outlier_windows], LocateConfig(), progress=False)
                row["outliers"] = outlier_summary(report)
        if tasks is not None:
            row["tasks"] = tasks.run(applied.model, loaded.tokenizer)
            row["task_tokens"] = tasks.tokens
    finally:
        applied.undo()
    row.update(setup_seconds=setup_seconds, quantization=applied.summary)
    return row


def add_deltas(rows: list[dict], baseline: dict | None, tasks: TaskSuite | None = None) -> list[dict]:
    """Δppl of every row against the baseline row (the unquantized, unmitigated model), and each task metric's
    Δ with its paired-bootstrap interval (computed once per row)."""
    for row in rows:
        if baseline is not None and row.get("ppl") is not None and baseline.get("ppl") is not None:
            row["delta_ppl"] = row["ppl"] - baseline["ppl"]
        if tasks is not None and baseline is not None and row is not baseline and "tasks" in row and not _has_task_deltas(row):
            for name, metrics in task_deltas(row["tasks"], baseline["tasks"], tasks.settings).items():
                for metric, record in metrics.items():
                    row["tasks"][name]["metrics"][metric].update(record)
    return rows


def _has_task_deltas(row: dict) -> bool:
    return any("delta" in score for entry in row["tasks"].values() for score in entry["metrics"].values())


def evaluate_variants(
    loaded, variants: list[Variant], windows: TokenWindows | None, calibration: torch.Tensor | None,
    batch_size: int = 1, on_row=None, tasks: TaskSuite | None = None, outlier_windows: int = 0,
    not_applicable: list[str | None] | None = None,
) -> list[dict]:
    """One row per variant, in order; ``on_row(rows)`` runs after each so a caller can save partial results.

    ``not_applicable`` (from ``massquant.validation``) gives, per variant, why it cannot run on this model:
    such a variant gets a row saying so and is not evaluated."""
    from massquant.validation import not_applicable_row

    rows: list[dict] = []
    baseline = None
    for index, variant in enumerate(variants):
        reason = not_applicable[index] if not_applicable else None
        if reason:
            rows.append(not_applicable_row(variant, reason))
            if on_row:
                on_row(rows)
            continue
        row = evaluate_variant(loaded, variant, windows, calibration, batch_size, tasks, outlier_windows)
        if variant.is_baseline and baseline is None:
            baseline = row
        rows.append(row)
        add_deltas(rows, baseline, tasks)
        if on_row:
            on_row(rows)
    return rows

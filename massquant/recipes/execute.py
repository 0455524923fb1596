"""Run a recipe's cells: each model loaded once, finished cells reused, every new cell saved as it ends."""

from __future__ import annotations

import copy
import dataclasses
import gc
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from massquant.data.calibration import calibration_batch
from massquant.data.text import load_text, text_fingerprint
from massquant.evaluation.perplexity import build_windows
from massquant.evaluation.runner import evaluate_variant
from massquant.evaluation.tasks import TaskSuite
from massquant.models.loading import load_model, max_sequence_length
from massquant.recipes.cache import CellCache
from massquant.recipes.grid import CELL_FORMAT, Cell
from massquant.recipes.schema import NO_TEXT
from massquant.reporting.compare import task_metrics
from massquant.reporting.results import environment
from massquant.reporting.tables import format_cell
from massquant.variants import check_variant


@dataclass
class RunOutcome:
    records: list[dict]  # one per cell, in recipe order
    computed: int
    reused: int


def flat_row(record: dict) -> dict:
    """A cell record as one table row: where it was measured, then the evaluation row."""
    data = record["data"]
    return {
        "cell": record["key"],
        "model": record["model"]["reference"],
        "dtype": record["model"]["dtype"],
        "model_fingerprint": record["model"]["fingerprint"],
        **{key: data[key] for key in ("data", "seq_len", "max_tokens", "stride", "bos")},
        **copy.deepcopy(record["row"]),  # Δs and intervals are added to the copy, never to the cell's record
        **task_metrics(record["row"]),
    }


class _ModelSession:
    """One loaded model with the windows and calibration batches its cells share."""

    def __init__(self, cell: Cell):
        self.loaded = load_model(dataclasses.replace(cell.model))
        self.texts: dict[str, str] = {}
        self.windows: dict[tuple, tuple] = {}
        self.calibrations: dict[tuple, torch.Tensor] = {}

    def windows_for(self, cell: Cell):
        """The cell's windows and its text's fingerprint; (None, None) when it measures tasks only."""
        key = cell.data_group
        if cell.data.data == NO_TEXT:
            return None, None
        if key not in self.windows:
            if cell.data.data not in self.texts:
                self.texts[cell.data.data] = load_text(cell.data.data)
            text = self.texts[cell.data.data]
            windows = build_windows(self.loaded.tokenizer, text, cell.data, max_sequence_length(self.loaded.model))
            self.windows[key] = (windows, text_fingerprint(text))
        return self.windows[key]

    def calibration_for(self, cell: Cell, bos: bool) -> torch.Tensor:
        settings = cell.calibration
        key = (settings, cell.seed, bos)
        if key not in self.calibrations:
            self.calibrations[key] = calibration_batch(
                self.loaded.tokenizer, settings.data, settings.samples, settings.seq_len, cell.seed, bos=bos
            )
        return self.calibrations[key]


def measure_cell(session: _ModelSession, cell: Cell, key: str, recipe_name: str, tasks: TaskSuite | None) -> dict:
    """Evaluate one cell on the session's model and return its self-describing record."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    windows, fingerprint = session.windows_for(cell)
    bos = windows.bos_token_id is not None if windows is not None else cell.data.bos != "never"
    calibration = session.calibration_for(cell, bos) if cell.variant.needs_calibration else None
    # Seeded per cell, so a resumed run computes what an uninterrupted one would have.
    random.seed(cell.seed)
    torch.manual_seed(cell.seed)
    row = evaluate_variant(session.loaded, cell.variant, windows, calibration, cell.data.batch_size, tasks)
    identity = cell.identity()
    loaded = session.loaded
    return {
        "format": CELL_FORMAT,
        "key": key,
        "recipe": recipe_name,
        "identity": identity,
        "model": loaded.record(),
        "data": {
            **identity["data"],
            "seq_len": windows.input_ids.shape[1] if windows is not None else None,
            "requested_seq_len": cell.data.seq_len,
            "batch_size": cell.data.batch_size,
            "bos_token_id": windows.bos_token_id if windows is not None else None,
            "text_fingerprint": fingerprint,
            "text_tokens": windows.text_tokens if windows is not None else None,
        },
        "calibration": identity["calibration"],
        "tasks": identity["tasks"],
        "seed": cell.seed,
        "row": row,
        "timings": {"started": started_at, "seconds": time.perf_counter() - started},
        "environment": environment(),
    }


def run_cells(
    cells: list[Cell], run_directory: Path, recipe_name: str,
    on_record: Callable[[list[dict]], None] | None = None,
) -> RunOutcome:
    """Reuse every cached cell, compute the rest; ``on_record(finished records)`` runs after each new cell."""
    cache = CellCache(run_directory)
    keys = [cell.key for cell in cells]
    records: dict[str, dict] = {}
    for key in keys:
        cached = cache.load(key)
        if cached is not None:
            records[key] = cached
    pending = [(cell, key) for cell, key in zip(cells, keys) if key not in records]
    pending = list({key: (cell, key) for cell, key in pending}.values())  # a cell listed twice runs once
    reused = len(set(keys)) - len(pending)
    tqdm.write(f"{recipe_name}: {len(set(keys))} cells, {reused} reused from {cache.directory}, {len(pending)} to compute", file=sys.stderr)
    # One recipe has one task setting; its names are checked (lm-eval's index built once) before any model loads.
    task_settings = next((cell.tasks for cell, _ in pending if cell.tasks is not None), None)
    suite = TaskSuite(task_settings) if task_settings is not None else None
    session = None
    progress = tqdm(total=len(pending), desc="cells", unit="cell", disable=not pending)
    try:
        for cell, key in pending:
            if session is None or session.loaded.config != cell.model:
                session = None
                gc.collect()
                session = _ModelSession(cell)
                for other, _ in pending:  # what this model would refuse, refused before its first cell runs
                    if other.model == cell.model:
                        check_variant(session.loaded, other.variant)
            progress.set_postfix_str(cell.variant.name)
            record = measure_cell(session, cell, key, recipe_name, suite if cell.tasks is not None else None)
            cache.store(record)
            records[key] = record
            progress.update(1)
            measured = f"ppl {format_cell(record['row']['ppl'])}, " if "ppl" in record["row"] else ""
            tqdm.write(
                f"  [{progress.n}/{len(pending)}] {cell.model.model} {cell.data.data} seq {record['data']['seq_len']} "
                f"{cell.variant.name}: {measured}{record['timings']['seconds']:.1f} s",
                file=sys.stderr,
            )
            if on_record:
                on_record([records[k] for k in dict.fromkeys(keys) if k in records])
    finally:
        progress.close()
    ordered = [records[key] for key in dict.fromkeys(keys)]
    return RunOutcome(ordered, computed=len(pending), reused=reused)

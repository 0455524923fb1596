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
from massquant.recipes.ray_executor import CellResources
from massquant.recipes.schema import NO_TEXT
from massquant.reporting.compare import task_metrics
from massquant.reporting.results import environment
from massquant.reporting.tables import format_cell
from massquant.errors import UserError
from massquant.models.loading import model_fingerprint, resolve_reference
from massquant.validation import model_facts, not_applicable, not_applicable_row, require_runnable
from massquant.variants import check_variant_settings


@dataclass(frozen=True)
class Executor:
    """Where ``run_cells`` computes cells: ``local`` (this process) or ``ray`` (a Ray cluster at ``address``,
    each worker asking for ``resources``; see ``massquant.recipes.ray_executor``)."""

    name: str = "local"
    address: str | None = None
    resources: CellResources = dataclasses.field(default_factory=CellResources)


@dataclass
class RunOutcome:
    records: list[dict]  # one per cell, in recipe order
    computed: int
    reused: int
    stale: dict[str, int] = dataclasses.field(default_factory=dict)  # why cached cells were computed again -> how many
    not_applicable: int = 0
    write_error: UserError | None = None  # a cell or results file that could not be written (the run went on)


def _text_fingerprint(reference: str, memo: dict) -> str:
    if reference not in memo:
        memo[reference] = text_fingerprint(load_text(reference))
    return memo[reference]


def with_inputs(cells: list[Cell]) -> list[Cell]:
    """Each cell with the content fingerprints of its model files and texts (each input hashed once;
    model files are cached by path, size and mtime across runs)."""
    memo: dict = {}
    done = []
    for cell in cells:
        model = cell.model.model
        if ("model", model) not in memo:
            memo[("model", model)] = model_fingerprint(resolve_reference(model))
        data = None if cell.data.data == NO_TEXT else _text_fingerprint(cell.data.data, memo)
        calibration = _text_fingerprint(cell.calibration.data, memo) if cell.variant.needs_calibration else None
        inputs = (("model", memo[("model", model)]), ("data", data), ("calibration", calibration))
        done.append(dataclasses.replace(cell, inputs=inputs))
    return done


def _changed_inputs(cell: Cell, record: dict) -> str:
    """Which of the cell's inputs differ from what the cached record measured, in words."""
    recorded = (record.get("identity") or {}).get("inputs") or {}
    current = cell.identity()["inputs"]
    names = {"model": f"model '{cell.model.model}'", "data": f"text '{cell.data.data}'", "calibration": f"calibration text '{cell.calibration.data}'"}
    changed = [names[key] for key in names if recorded.get(key) != current.get(key)]
    return " and ".join(changed) + " changed" if changed else "its record differs"


def _record_head(cell: Cell, key: str, recipe_name: str) -> dict:
    """What every cell record starts with: its format, key, slot, recipe and identity."""
    return {"format": CELL_FORMAT, "key": key, "slot": cell.slot, "recipe": recipe_name, "identity": cell.identity()}


def not_applicable_record(cell: Cell, key: str, recipe_name: str, reason: str) -> dict:
    """A cell that cannot run on its model: a record like a measured one, with no numbers (never cached)."""
    head = _record_head(cell, key, recipe_name)
    identity = head["identity"]
    return {
        **head,
        "model": {"reference": cell.model.model, "source": None, "fingerprint": identity["inputs"].get("model"), **vars(cell.model)},
        "data": {**identity["data"], "text_fingerprint": identity["inputs"].get("data")},
        "calibration": identity["calibration"],
        "tasks": identity["tasks"],
        "seed": cell.seed,
        "row": not_applicable_row(cell.variant, reason),
    }


def applicability(cells: list[Cell]) -> dict[str, str | None]:
    """Per cell key: why the cell cannot run on its model (None: it can), read from each model's config
    before any weights load. Models whose config cannot be read first are left out (checked once loaded)."""
    reasons: dict[str, str | None] = {}
    for model in _unique_models(cells):
        mine = [cell for cell in cells if cell.model == model]
        facts = model_facts(model)
        if facts is not None:
            for cell, reason in zip(mine, not_applicable(facts, [cell.variant for cell in mine])):
                reasons[cell.key] = reason
    return reasons


def _unique_models(cells: list[Cell]) -> list:
    models: list = []
    for cell in cells:
        if cell.model not in models:
            models.append(cell.model)
    return models


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
    head = _record_head(cell, key, recipe_name)
    identity = head["identity"]
    loaded = session.loaded
    return {
        **head,
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
    on_record: Callable[[list[dict]], None] | None = None, recompute: bool = False, executor: Executor | None = None,
) -> RunOutcome:
    """Reuse every cached cell whose inputs are unchanged, compute the rest; ``on_record(finished records)`` runs
    after each new cell. ``recompute`` ignores the cache. A cell that cannot run on its model gets a
    "not applicable" record; only a recipe where no requested cell can run is an error. ``executor``:
    where cells are computed (default: this process, one after another)."""
    for cell in cells:  # what no model allows (a training-time mitigation, a missing library): refused at once
        check_variant_settings(cell.variant)
    cells = with_inputs(cells)
    cache = CellCache(run_directory)
    keys = [cell.key for cell in cells]
    reasons = applicability(cells)
    if len(reasons) == len(set(keys)):  # every model's config was read: a recipe where nothing can run ends here
        require_runnable([cell.variant for cell in cells], [reasons[key] for key in keys])
    records: dict[str, dict] = {}
    for cell, key in zip(cells, keys):
        if reasons.get(key):
            records[key] = not_applicable_record(cell, key, recipe_name, reasons[key])
        elif not recompute and (cached := cache.load(key)) is not None:
            records[key] = cached
    pending = [(cell, key) for cell, key in zip(cells, keys) if key not in records]
    pending = list({key: (cell, key) for cell, key in pending}.values())  # a cell listed twice runs once
    stale: dict[str, int] = {}
    if pending and not recompute:
        earlier = cache.by_slot()
        for cell, _ in pending:
            if cell.slot in earlier:
                reason = _changed_inputs(cell, earlier[cell.slot])
                stale[reason] = stale.get(reason, 0) + 1
    not_runnable = sum(1 for key in set(keys) if reasons.get(key))
    reused = len(set(keys)) - len(pending) - not_runnable
    explained = "".join(f"; {count} recomputed: {reason}" for reason, count in stale.items())
    tqdm.write(
        f"{recipe_name}: {len(set(keys))} cells, {reused} reused from {cache.directory}, {len(pending)} to compute"
        f"{' (--recompute)' if recompute else ''}{explained}"
        f"{f'; {not_runnable} not applicable' if not_runnable else ''}",
        file=sys.stderr,
    )
    # One recipe has one task setting; its names are checked (lm-eval's index built once) before any model loads.
    task_settings = next((cell.tasks for cell, _ in pending if cell.tasks is not None), None)
    suite = TaskSuite(task_settings) if task_settings is not None else None
    if executor is not None and executor.name == "ray" and pending:
        return _run_on_ray(cells, keys, records, pending, reasons, run_directory, recipe_name, task_settings, executor, on_record, stale, reused)
    session = None
    write_error = None
    computed = 0
    progress = tqdm(total=len(pending), desc="cells", unit="cell", disable=not pending)
    try:
        for cell, key in pending:
            if session is None or session.loaded.config != cell.model:
                session = None
                gc.collect()
                session = _ModelSession(cell)
                unchecked = [other for other, other_key in pending if other.model == cell.model and other_key not in reasons]
                # its config could not be read before loading: checked now, before its first forward
                for other, reason in zip(unchecked, not_applicable(session.loaded, [other.variant for other in unchecked])):
                    reasons[other.key] = reason
            if reasons.get(key):
                records[key] = not_applicable_record(cell, key, recipe_name, reasons[key])
                progress.update(1)
                continue
            progress.set_postfix_str(cell.variant.name)
            record = measure_cell(session, cell, key, recipe_name, suite if cell.tasks is not None else None)
            computed += 1
            try:
                cache.store(record)
            except UserError as error:  # keep computing: the records are printed at the end
                write_error = error
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
    return _outcome(cells, keys, records, reasons, computed, reused, stale, write_error)


def _outcome(cells, keys, records, reasons, computed, reused, stale, write_error) -> RunOutcome:
    """The records in recipe order; a recipe where no cell could run (models checked only once loaded) is an error."""
    ordered = [records[key] for key in dict.fromkeys(keys)]
    require_runnable([cell.variant for cell in cells], [reasons.get(key) for key in keys])
    return RunOutcome(
        ordered, computed=computed, reused=reused, stale=stale,
        not_applicable=sum(1 for key in set(keys) if reasons.get(key)), write_error=write_error,
    )


def _run_on_ray(
    cells, keys, records, pending, reasons, run_directory, recipe_name, task_settings, executor: Executor, on_record, stale, reused,
) -> RunOutcome:
    """``run_cells``'s loop on a Ray cluster: workers measure and cache the cells, the driver collects them."""
    from massquant.recipes import ray_executor

    ray_executor.connect(executor.address)
    write_error = None
    computed = 0
    for key, record, error in ray_executor.compute(pending, run_directory, recipe_name, task_settings, executor.resources):
        records[key] = record
        if record["row"].get("not_applicable"):
            reasons[key] = record["row"]["not_applicable"]
        else:
            computed += 1
        if error:
            write_error = UserError(error)
        if on_record:
            on_record([records[k] for k in dict.fromkeys(keys) if k in records])
    return _outcome(cells, keys, records, reasons, computed, reused, stale, write_error)

"""Recipe cells on a Ray cluster (``massquant run RECIPE --executor ray [--address ADDR]``).

Ray (https://docs.ray.io) schedules; massquant only says what a cell needs.
Cells are grouped by model: each group gets Ray actors that load the model
once (``CellWorker``) and measure cells one after another, as ``massquant run``
does in one process. A recipe's ``resources`` (``num_cpus``, ``num_gpus``) is
what each worker asks Ray for, so a cluster runs as many at once as it has room
for.

The content-addressed cell cache stays the source of truth: a worker writes
each finished cell into the run directory's ``cells/`` (which must be a
directory every node sees) before returning it, and the driver collects
records, shows progress and writes ``results.json``. A worker that dies mid-cell
(a killed process, a lost node) is restarted by Ray, which calls the unfinished
cell again (``max_restarts``, ``max_task_retries``); the cells it finished are
in the cache, so only that cell is computed again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from massquant.errors import UserError

RESTARTS = 3  # times Ray restarts a dead worker, and retries the cell it was measuring


@dataclass(frozen=True)
class CellResources:
    """What one cell's worker asks Ray for (recipe key ``resources``): CPU cores and GPUs (fractions allowed)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def validate(self, where: str) -> "CellResources":
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise UserError(f"{where}: resources: {name} must be a number >= 0; got {value!r}")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise UserError(f"{where}: resources: a worker needs num_cpus or num_gpus above 0")
        return self


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``auto``: the one ``ray start`` runs on this machine; a
    ``ray://host:10001`` client address), or start a local one; nothing when this process already joined one."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'massquant[ray]' (or pip install 'ray[default]')") from None
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UserError(f"cannot connect to the Ray cluster at '{address}': {error}") from None


def _measure(session, cell, key: str, recipe_name: str, suite) -> dict:
    from massquant.recipes.execute import measure_cell

    return measure_cell(session, cell, key, recipe_name, suite)


class CellWorker:
    """A Ray actor holding one loaded model; ``measure`` returns a cell's record (and a cache write error)."""

    def __init__(self, first_cell, run_directory: str, recipe_name: str, task_settings, measure: Callable):
        from massquant.evaluation.tasks import TaskSuite
        from massquant.recipes.cache import CellCache
        from massquant.recipes.execute import _ModelSession

        self.session = _ModelSession(first_cell)
        self.cache = CellCache(Path(run_directory))
        self.recipe_name = recipe_name
        self.suite = TaskSuite(task_settings) if task_settings is not None else None
        self.measure_function = measure

    def measure(self, cell, key: str) -> tuple[dict, str | None]:
        from massquant.recipes.execute import not_applicable_record
        from massquant.validation import not_applicable

        cached = self.cache.load(key)  # finished before a restart, or by another run sharing the directory
        if cached is not None:
            return cached, None
        reason = not_applicable(self.session.loaded, [cell.variant])[0]
        if reason:
            return not_applicable_record(cell, key, self.recipe_name, reason), None
        record = self.measure_function(self.session, cell, key, self.recipe_name, self.suite if cell.tasks is not None else None)
        try:
            self.cache.store(record)
        except UserError as error:
            return record, str(error)
        return record, None


def compute(
    pending: list[tuple], run_directory: Path, recipe_name: str, task_settings, resources: CellResources,
    measure: Callable = _measure,
) -> Iterator[tuple[str, dict, str | None]]:
    """Measure ``pending`` (cell, key) pairs on the Ray cluster this process joined (``connect``); yields
    (key, record, cache write error) as cells finish, with a progress bar on the driver.

    ``measure(session, cell, key, recipe_name, suite)`` is the per-cell function (``measure_cell``).
    """
    import ray
    from ray.util import ActorPool

    remote_worker = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS)(CellWorker)
    capacity = ray.cluster_resources()
    slots = min(
        capacity.get("CPU", 0) / resources.num_cpus if resources.num_cpus else math.inf,
        capacity.get("GPU", 0) / resources.num_gpus if resources.num_gpus else math.inf,
    )
    if slots < 1:
        raise UserError(
            f"the Ray cluster has {capacity.get('CPU', 0):g} CPUs and {capacity.get('GPU', 0):g} GPUs; one cell worker "
            f"asks for num_cpus={resources.num_cpus:g}, num_gpus={resources.num_gpus:g} (recipe key 'resources')"
        )
    groups: dict[str, list] = {}
    for cell, key in pending:
        groups.setdefault(repr(cell.model), []).append((cell, key))  # ModelConfig is not hashable; its repr has every field
    directory = str(Path(run_directory).resolve())
    progress = tqdm(total=len(pending), desc="cells (ray)", unit="cell")
    try:
        for cells in groups.values():  # one model at a time: its workers load it once each
            workers = [
                remote_worker.options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus).remote(
                    cells[0][0], directory, recipe_name, task_settings, measure
                )
                for _ in range(int(min(slots, len(cells))))
            ]
            pool = ActorPool(workers)
            for record, write_error in pool.map_unordered(lambda worker, item: worker.measure.remote(*item), cells):
                progress.update(1)
                progress.set_postfix_str(record["row"].get("config", ""))
                yield record["key"], record, write_error
            for worker in workers:
                ray.kill(worker)
    except ray.exceptions.RayError as error:
        raise UserError(f"the Ray cluster could not finish the recipe: {type(error).__name__}: {str(error).splitlines()[0]}") from None
    finally:
        progress.close()

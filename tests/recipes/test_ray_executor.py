"""Recipe cells on a local Ray cluster (2 CPUs, started here): the same records as in one process, and a
worker killed mid-cell costs only that cell."""

from __future__ import annotations

import functools
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from massquant.errors import UserError  # noqa: E402
from massquant.recipes import ray_executor  # noqa: E402
from massquant.recipes.execute import Executor, measure_cell, run_cells, with_inputs  # noqa: E402
from massquant.recipes.schema import expand, recipe_from_mapping  # noqa: E402
from tests.conftest import TRAINING_TEXT  # noqa: E402

SPECS = ["w8", "w8a8", "w4g16"]  # with the full-precision baseline: 4 cells


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests package
    yield
    ray.shutdown()


@pytest.fixture()
def cells(tiny_llama_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TRAINING_TEXT)
    recipe = recipe_from_mapping(
        {"kind": "grid", "model": [tiny_llama_dir], "data": [str(text)], "seq_len": [32], "max_tokens": 256, "spec": SPECS},
        "test recipe",
    )
    return expand(recipe)


def measured(value):
    """A record's numbers without its timings (wall-clock seconds differ between any two runs)."""
    if isinstance(value, dict):
        return {key: measured(item) for key, item in value.items() if "seconds" not in key}
    return [measured(item) for item in value] if isinstance(value, list) else value


def rows(records: list[dict]) -> list[tuple]:
    return [(record["key"], measured(record["row"])) for record in records]


def test_ray_computes_the_records_one_process_does(cluster, cells, tmp_path):
    local = run_cells(cells, tmp_path / "local", "grid")
    on_ray = run_cells(cells, tmp_path / "ray", "grid", executor=Executor("ray", None, ray_executor.CellResources(num_cpus=1)))
    assert on_ray.computed == local.computed == 4
    assert rows(on_ray.records) == rows(local.records)  # every number, bit for bit
    assert sorted(path.name for path in (tmp_path / "ray" / "cells").iterdir()) == sorted(f"{record['key']}.json" for record in local.records)
    again = run_cells(cells, tmp_path / "ray", "grid", executor=Executor("ray", None, ray_executor.CellResources()))
    assert (again.computed, again.reused) == (0, 4)  # the shared cell cache is the source of truth


def measure_then_die_once(attempts: Path, victim: str, session, cell, key, recipe_name, suite) -> dict:
    """measure_cell, recording each attempt; the victim's first attempt kills its worker before it returns."""
    (attempts / f"{key}.{uuid.uuid4().hex}").touch()
    record = measure_cell(session, cell, key, recipe_name, suite)
    if key == victim and not (attempts / "killed").exists():
        (attempts / "killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return record


def test_a_worker_killed_mid_cell_costs_only_that_cell(cluster, cells, tmp_path):
    pending = [(cell, cell.key) for cell in with_inputs(cells)]
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    victim = pending[1][1]
    measure = functools.partial(measure_then_die_once, attempts, victim)
    finished = dict(
        (key, record) for key, record, _ in ray_executor.compute(
            pending, tmp_path / "run", "grid", None, ray_executor.CellResources(num_cpus=1), measure=measure,
        )
    )
    assert (attempts / "killed").exists()
    tried = sorted(path.name.split(".")[0] for path in attempts.iterdir() if path.name != "killed")
    assert tried == sorted([key for _, key in pending] + [victim])  # the victim twice, every other cell once
    assert set(finished) == {key for _, key in pending}
    reference = run_cells(cells, tmp_path / "local", "grid")
    assert [(key, measured(finished[key]["row"])) for key, _ in rows(reference.records)] == rows(reference.records)


def test_resources_are_checked_against_the_cluster_and_in_the_recipe(cluster, cells, tmp_path):
    with pytest.raises(UserError, match="asks for num_cpus=4"):
        list(ray_executor.compute([(cells[0], cells[0].key)], tmp_path, "grid", None, ray_executor.CellResources(num_cpus=4)))
    with pytest.raises(UserError, match="resources: num_gpus must be a number >= 0"):
        recipe_from_mapping({"kind": "grid", "resources": {"num_gpus": -1}}, "test recipe")
    with pytest.raises(UserError, match="resources.*num_gpu"):
        recipe_from_mapping({"kind": "grid", "resources": {"num_gpu": 1}}, "test recipe")

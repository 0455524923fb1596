"""Recipes: schema errors, grid expansion, cell keys, the cell cache, and resuming an interrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from massquant.cli.main import main
from massquant.errors import UserError
from massquant.massive import MassivePolicy
from massquant.mitigations import MitigationChoice
from massquant.quantizers.spec import parse_spec
from massquant.recipes.execute import run_cells
from massquant.variants import variant_grid
from massquant.recipes.schema import expand, load_recipe, recipe_from_mapping
from massquant.variants import Variant
from tests.conftest import TRAINING_TEXT, make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "recipes" / "formats.yaml"


def grid_recipe(**fields):
    return recipe_from_mapping({"kind": "grid", **fields}, "test recipe")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Hidden 128, so every spec of the shipped formats recipe (g128, MX blocks of 32, NV blocks of 16) applies."""
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny-128"), hidden=128))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe-text") / "text.txt"
    path.write_text(TRAINING_TEXT)
    return str(path)


def test_variant_grid_is_baseline_then_mitigation_by_policy_by_spec():
    w8, w4 = parse_spec("w8a8"), parse_spec("w4a8")
    none, keep = MassivePolicy(), MassivePolicy("keep")
    # parameters are dicts: the grid must not need to hash variants
    smooth = (MitigationChoice("smoothquant", {"alpha": 0.5}),)
    grid = variant_grid([w8, w4], [none, keep], [(), smooth, smooth])
    expected = [
        Variant(),
        Variant(w8, none), Variant(w4, none), Variant(w8, keep), Variant(w4, keep),
        Variant(mitigation=smooth),
        Variant(w8, none, smooth), Variant(w4, none, smooth), Variant(w8, keep, smooth), Variant(w4, keep, smooth),
    ]
    assert grid == expected


def test_expand_multiplies_models_texts_and_windows(text_file):
    recipe = grid_recipe(model=["a-model-dir", {"model": "b-model-dir", "dtype": "bfloat16"}], data=[text_file, "lee-news"],
                         seq_len=[64, 128], spec=["w8a8,w8a8-tensor", "kv4"])
    cells = expand(recipe)
    assert len(cells) == 2 * 2 * 2 * 4
    groups = [cells[i : i + 4] for i in range(0, len(cells), 4)]
    for group in groups:  # each group shares windows; its baseline comes first
        assert [cell.variant.spec_name for cell in group] == ["fp", "w8a8", "w8a8-tensor", "kv4"]
        assert len({cell.data_group for cell in group}) == 1
    assert [g[0].model.model for g in groups] == ["a-model-dir"] * 4 + ["b-model-dir"] * 4
    assert groups[4][0].model.dtype == "bfloat16"


def test_cell_keys_follow_what_decides_the_numbers(text_file):
    base = dict(data=text_file, seq_len=64, spec=["w8a8", "a8-static"])
    keys = [cell.key for cell in expand(grid_recipe(**base))]
    assert len(set(keys)) == 3
    # batch sizes can change the last digits (padding, batched kernels): they are part of a cell's identity
    assert not set(cell.key for cell in expand(grid_recipe(**base, batch_size=4))) & set(keys)
    # the calibration text matters only to the statically calibrated spec
    recalibrated = [cell.key for cell in expand(grid_recipe(**base, calib_data=text_file))]
    assert recalibrated[:2] == keys[:2] and recalibrated[2] != keys[2]
    # the window length decides every number
    assert not set(cell.key for cell in expand(grid_recipe(**{**base, "seq_len": 32}))) & set(keys)


@pytest.mark.parametrize("text, message", [
    ("kind: grid\nspecs: [w8]\n", "unknown key 'specs' (did you mean 'spec'?); accepted: model, dtype"),
    ("kind: grid\nspec: [w8\n", "is not valid YAML at line 3"),
    ("spec: [w8]\n", "has no 'kind'; evaluation grids start with 'kind: grid'"),
    ("kind: train\nsteps: 10\n", "has 'kind: train'"),
    ("kind: grid\ntable: {rows: [quant]}\n", "table: unknown row/column key 'quant'"),
    ("kind: grid\ntable: {value: perplexity}\n", "table: unknown value 'perplexity'"),
    ("kind: grid\ncalib_sample: 4\n", "unknown key 'calib_sample' (did you mean 'calib_samples'?)"),
    ("kind: grid\nseq_len: [0]\n", "seq_len: expected a positive integer"),
    ("kind: grid\nmodel: [{dtype: float32}]\n", "each entry of 'model' is a model reference or a mapping with a 'model' key"),
    ("- a\n- b\n", "expected a mapping starting with 'kind: grid'; got list"),
])
def test_recipe_errors_name_the_file_and_what_is_accepted(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_grid_errors_come_before_any_model_loads(tmp_path, capsys):
    for fields, message in [
        ({"spec": ["w9"]}, "spec 'w9'"),
        ({"data": "no-such-corpus"}, "unknown text 'no-such-corpus'"),
        ({"massive": ["keepp"]}, "massive: unknown value 'keepp'; accepted: none, keep"),
        ({"data": "none"}, "nothing to measure"),
    ]:
        with pytest.raises(UserError, match=message):
            expand(grid_recipe(**fields))
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    error = capsys.readouterr().err
    assert error.splitlines() == [f"massquant: error: cannot read recipe '{tmp_path / 'missing.yaml'}': No such file or directory"]


def test_growing_a_grid_computes_only_the_new_cells(tmp_path, tiny_model, text_file):
    small = expand(grid_recipe(model=[tiny_model], data=text_file, seq_len=32, max_tokens=64, spec=["w8a8"]))
    first = run_cells(small, tmp_path, "small")
    assert (first.computed, first.reused) == (2, 0)
    grown = expand(grid_recipe(model=[tiny_model], data=text_file, seq_len=32, max_tokens=64, spec=["w8a8", "w4g32"]))
    second = run_cells(grown, tmp_path, "grown")
    assert (second.computed, second.reused) == (1, 2)
    assert [r["row"]["ppl"] for r in second.records[:2]] == [r["row"]["ppl"] for r in first.records]
    record = second.records[2]
    assert record["row"]["spec"] == "w4g32" and record["model"]["fingerprint"].startswith("sha256:")
    assert set(record["environment"]["versions"]) >= {"massquant", "torch", "transformers", "lm-eval"}
    assert record["data"]["text_fingerprint"].startswith("sha256:") and record["seed"] == 0


def _cells(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in (directory / "cells").glob("*.json")}


def _start(arguments: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "massquant", "run", *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _stop_after(process: subprocess.Popen, directory: Path, finished: int, sent: signal.Signals, timeout: float = 300) -> None:
    """Send ``sent`` as soon as more than ``finished`` cells are on disk (a finished cell is one renamed file)."""
    deadline = time.monotonic() + timeout
    while len(list((directory / "cells").glob("*.json"))) <= finished:
        assert process.poll() is None, f"the run ended before it could be interrupted: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(sent)


def test_shipped_recipe_killed_twice_resumes_to_the_uninterrupted_table(tmp_path, tiny_model, text_file, capsys):
    arguments = [str(SHIPPED), "--model", tiny_model, "--data", text_file, "--seq-len", "32", "--max-tokens", "40"]
    total = len(yaml.safe_load(SHIPPED.read_text())["spec"]) + 1

    assert main(["run", *arguments, "--out", str(tmp_path / "straight")]) == 0
    reference = capsys.readouterr().out

    resumed = tmp_path / "resumed"
    first = _start([*arguments, "--out", str(resumed)])
    _stop_after(first, resumed, 0, signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130 and "interrupted; finished results were saved" in stderr
    after_first = _cells(resumed)
    assert 1 <= len(after_first) < total

    second = _start([*arguments, "--out", str(resumed)])
    _stop_after(second, resumed, len(after_first), signal.SIGKILL)
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == -signal.SIGKILL
    assert f"{total} cells, {len(after_first)} reused" in stderr  # keys computed in another process match
    after_second = _cells(resumed)
    assert len(after_first) < len(after_second) < total
    assert {name: after_second[name] for name in after_first} == after_first  # finished cells never rewritten

    assert main(["run", *arguments, "--out", str(resumed)]) == 0
    output = capsys.readouterr()
    assert f"{total} cells, {len(after_second)} reused" in output.err
    assert f"cells: {total - len(after_second)} computed, {len(after_second)} reused" in output.err
    assert {name: _cells(resumed)[name] for name in after_second} == after_second
    assert output.out == reference
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    again = json.loads((resumed / "results.json").read_text())
    assert [(r["config"], r["ppl"]) for r in again["rows"]] == [(r["config"], r["ppl"]) for r in straight["rows"]]
    assert (again["computed"], again["reused"]) == (total - len(after_second), len(after_second))

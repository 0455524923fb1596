"""Evaluation recipes: a YAML grid of models x texts x window lengths x specs x massive policies x mitigations.

A recipe starts with ``kind: grid`` (training recipes, ``recipes/train-*.yaml``,
have their own schema and run with ``massquant train``). Every other key is
optional; a list key also takes a single value::

    kind: grid
    name: sun-w8a8
    models: [smollm2-135m]        # aliases, paths, hub ids, or mappings of ModelConfig fields
    data: enwiki-sample
    seq_len: 512
    max_tokens: 4096
    specs: [w8a8, w8a8-tensor]
    massive: [none, keep]
    mitigations: [none, "smoothquant:alpha=0.8"]
    table: {rows: [massive], cols: spec, value: ppl}
    resources: {num_cpus: 1, num_gpus: 0}   # what each worker asks Ray for (--executor ray)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from massquant.config import MAX_SEED, MAX_SEQUENCES, check_int, from_mapping, read_yaml
from massquant.data.text import DEFAULT_TEXT, TEXT_SOURCES
from massquant.errors import UserError
from massquant.evaluation.perplexity import PerplexityConfig
from massquant.evaluation.tasks import TaskSettings
from massquant.massive import MassiveCriteria
from massquant.models.loading import DEFAULT_MODEL, ModelConfig
from massquant.reporting.compare import PERPLEXITY_VALUES, View, check_layout_keys
from massquant.recipes.ray_executor import CellResources
from massquant.recipes.grid import (
    CalibrationSettings, Cell, massive_policies, mitigation_variants, parse_specs, variant_grid,
)

RECIPE_KIND = "grid"


@dataclass
class GridRecipe:
    kind: str
    name: str = ""  # default: the file name without .yaml
    description: str = ""
    models: list[str | dict] = field(default_factory=lambda: [DEFAULT_MODEL])
    data: list[str] = field(default_factory=lambda: [DEFAULT_TEXT])  # "none": tasks only, no perplexity
    seq_len: list[int | None] = field(default_factory=lambda: [None])  # None: 2048 or the model's maximum
    max_tokens: int | None = None
    stride: int | None = None
    bos: str = "auto"
    batch_size: int = 1
    specs: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=lambda: ["fake"])
    massive: list[str] = field(default_factory=lambda: ["none"])
    massive_detection: str = "calibrated"
    massive_threshold: float = MassiveCriteria.abs_threshold
    massive_ratio: float = MassiveCriteria.median_ratio
    mitigations: list[str] = field(default_factory=lambda: ["none"])
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    quantize_lm_head: bool = False
    bnb_threshold: float = 6.0
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks or groups (massquant_arc_easy, ...)
    limit: int | float | None = None  # lm-eval: questions per task (a fraction when < 1)
    num_fewshot: int | None = None
    task_batch_size: int = 1
    bootstrap: int = 1000  # paired-bootstrap resamples per task Δ
    seed: int = 0
    table: View = field(default_factory=View)  # how 'massquant run' prints the grid
    resources: CellResources = field(default_factory=CellResources)  # per worker under --executor ray


def load_recipe(path: str | Path) -> GridRecipe:
    """Read and check a recipe file; every error is one line naming the file."""
    path = Path(path)
    return recipe_from_mapping(read_yaml(path, f"recipe '{path}'"), f"recipe '{path}'", default_name=path.stem)


def recipe_from_mapping(mapping, where: str, default_name: str = "recipe") -> GridRecipe:
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping starting with 'kind: {RECIPE_KIND}'; got {type(mapping).__name__}")
    if mapping.get("kind") != RECIPE_KIND:
        found = f"'kind: {mapping['kind']}'" if "kind" in mapping else "no 'kind'"
        raise UserError(
            f"{where} has {found}; evaluation grids start with 'kind: {RECIPE_KIND}' "
            "(training recipes run with 'massquant train')"
        )
    recipe = from_mapping(GridRecipe, mapping, where)
    if "calibration" in mapping:
        recipe.calibration = from_mapping(CalibrationSettings, mapping["calibration"], f"{where}: calibration")
    if "table" in mapping:
        recipe.table = from_mapping(View, mapping["table"], f"{where}: table")
    if "resources" in mapping:
        recipe.resources = from_mapping(CellResources, mapping["resources"], f"{where}: resources")
    recipe.resources.validate(where)
    recipe.table.rows = [str(key) for key in recipe.table.rows]
    check_layout_keys(recipe.table.rows, recipe.table.cols, f"{where}: table: ")
    if recipe.table.value not in PERPLEXITY_VALUES and not recipe.tasks:  # task metrics are named by lm-eval
        raise UserError(f"{where}: table: unknown value '{recipe.table.value}'; accepted: {', '.join(PERPLEXITY_VALUES)}")
    recipe.name = recipe.name or default_name
    for name in ("models", "data", "seq_len"):  # an empty list would make a grid of nothing
        if not getattr(recipe, name):
            raise UserError(f"{where}: '{name}' is empty; list at least one (or leave the key out for the default)")
    recipe.models = [_model_config(item, where) for item in recipe.models]
    recipe.seq_len = [_optional_positive(value, "seq_len", where) for value in recipe.seq_len]
    recipe.data = [str(item) for item in recipe.data]
    for name in ("specs", "backends", "massive", "mitigations", "include", "exclude", "tasks"):
        setattr(recipe, name, [str(item) for item in getattr(recipe, name)])
    return recipe


def _model_config(item, where: str) -> ModelConfig:
    if isinstance(item, str):
        return ModelConfig(model=item)
    if isinstance(item, dict) and "model" in item:
        return from_mapping(ModelConfig, item, f"{where}: models")
    raise UserError(f"{where}: each entry of 'models' is a model reference or a mapping with a 'model' key; got {item!r}")


def _optional_positive(value, key: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{where}: '{key}' expects positive integers (or null for the default); got {value!r}")
    return value


def with_overrides(recipe: GridRecipe, models=None, data=None, seq_len=None, max_tokens=None) -> GridRecipe:
    """The same grid on other models or a smaller slice of text (command-line overrides)."""
    changes = {}
    if models:
        changes["models"] = [ModelConfig(model=model) for model in models]
    if data:
        changes["data"] = list(data)
    if seq_len:
        changes["seq_len"] = [seq_len]
    if max_tokens:
        changes["max_tokens"] = max_tokens
    return dataclasses.replace(recipe, **changes)


NO_TEXT = "none"


def _check_text(reference: str, where: str) -> None:
    if reference not in TEXT_SOURCES and not Path(reference).expanduser().is_file():
        raise UserError(f"{where}: unknown text '{reference}': not a file; named corpora: {', '.join(TEXT_SOURCES)}")


def expand(recipe: GridRecipe, where: str = "recipe") -> list[Cell]:
    """Every cell, model by model (one load each), the baseline first in each text/window group.

    Everything a recipe can get wrong is checked here, before any model loads.
    """
    calibration = recipe.calibration
    check_int(calibration.samples, f"{where}: calibration samples", high=MAX_SEQUENCES)
    check_int(calibration.seq_len, f"{where}: calibration seq_len")
    check_int(recipe.seed, f"{where}: seed", low=0, high=MAX_SEED)
    check_int(recipe.batch_size, f"{where}: batch_size")
    _check_text(calibration.data, f"{where}: calibration")
    specs = parse_specs(
        [text for item in recipe.specs for text in item.split(",") if text.strip()], recipe.backends or ["fake"],
        include=tuple(recipe.include), exclude=tuple(recipe.exclude), quantize_lm_head=recipe.quantize_lm_head,
        bnb_threshold=recipe.bnb_threshold, calibration_samples=calibration.samples,
    )
    criteria = MassiveCriteria(recipe.massive_threshold, recipe.massive_ratio)
    policies = massive_policies(recipe.massive, recipe.massive_detection, criteria)
    variants = variant_grid(specs, policies, mitigation_variants(recipe.mitigations))
    tasks = None
    if recipe.tasks:
        tasks = TaskSettings(
            tuple(recipe.tasks), recipe.limit, recipe.num_fewshot, recipe.task_batch_size, recipe.bos, recipe.bootstrap,
            seed=recipe.seed,
        ).validate()
    elif NO_TEXT in recipe.data:
        raise UserError(f"{where}: 'data: {NO_TEXT}' measures no perplexity, and no 'tasks' are listed; nothing to measure")
    cells = []
    for model in recipe.models:
        model.validate()
        for data in recipe.data:
            if data != NO_TEXT:
                _check_text(data, where)
            for seq_len in recipe.seq_len:
                text_config = PerplexityConfig(data, seq_len, recipe.stride, recipe.max_tokens, recipe.bos, recipe.batch_size)
                text_config.validate()
                cells.extend(Cell(model, text_config, variant, calibration, tasks, recipe.seed) for variant in variants)
    return cells

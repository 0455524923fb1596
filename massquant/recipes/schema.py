"""Evaluation recipes: a YAML grid of models x texts x window lengths x specs x massive policies x mitigations.

A recipe starts with ``kind: grid`` (training recipes, ``recipes/train-*.yaml``,
have their own schema and run with ``massquant train``). Every other key is
optional and is a declared option (``massquant.options``), spelled as in
lm-eval's model_args and as the flag without dashes; a list key also takes a
single value::

    kind: grid
    name: sun-w8a8
    model: [smollm2-135m]         # aliases, paths, hub ids, or mappings of model options
    data: enwiki-sample
    seq_len: 512
    max_tokens: 4096
    spec: [w8a8, w8a8-tensor]
    massive: [none, keep]
    mitigation: [none, "smoothquant:alpha=0.8"]
    calib_samples: 4
    table: {rows: [massive], cols: spec, value: ppl}
    resources: {num_cpus: 1, num_gpus: 0}   # what each worker asks Ray for (--executor ray)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from massquant import options
from massquant.config import from_mapping, read_yaml
from massquant.data.text import TEXT_SOURCES
from massquant.errors import UserError
from massquant.models.loading import ModelConfig
from massquant.options import settings
from massquant.reporting.compare import PERPLEXITY_VALUES, View, check_layout_keys
from massquant.recipes.grid import Cell
from massquant.recipes.ray_executor import CellResources

RECIPE_KIND = "grid"
# A grid recipe takes every option of these groups (``massquant.options.declarations``) as a key;
# model, data and seq_len take lists (one cell each), and so do spec, backend, massive and mitigation.
GRID_GROUPS = ("model", "text", "quantization", "calibration", "massive", "mitigation", "tasks", "run")
GRID_SKIP = ("n_seqs",)  # sampled sequences belong to locate/errors, not to a grid of windows
RECIPE_KEYS = ("kind", "name", "description", "table", "resources")


@dataclass
class GridRecipe:
    name: str
    description: str = ""
    table: View = field(default_factory=View)  # how 'massquant run' prints the grid
    values: SimpleNamespace = field(default_factory=lambda: options.from_mapping({}, GRID_GROUPS, "recipe", skip=GRID_SKIP))
    resources: CellResources = field(default_factory=CellResources)  # per worker under --executor ray

    def models(self, where: str = "recipe") -> list[ModelConfig]:
        return [_model_config(item, self.values, where) for item in self.values.model]


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
    values = options.from_mapping(mapping, GRID_GROUPS, where, extra=RECIPE_KEYS, skip=GRID_SKIP)
    for key in ("name", "description"):
        if not isinstance(mapping.get(key, ""), str):
            raise UserError(f"{where}: '{key}' expects a string; got {mapping[key]!r}")
    table = options_table(mapping.get("table", {}), where)
    if table.value not in PERPLEXITY_VALUES and not values.tasks:  # task metrics are named by lm-eval
        raise UserError(f"{where}: table: unknown value '{table.value}'; accepted: {', '.join(PERPLEXITY_VALUES)}")
    resources = from_mapping(CellResources, mapping.get("resources", {}), f"{where}: resources").validate(where)
    recipe = GridRecipe(mapping.get("name") or default_name, mapping.get("description", ""), table, values, resources)
    recipe.models(where)  # model mappings are checked now
    return recipe


def options_table(mapping, where: str) -> View:
    view = from_mapping(View, mapping, f"{where}: table")
    view.rows = [str(key) for key in view.rows]
    check_layout_keys(view.rows, view.cols, f"{where}: table: ")
    return view


def _model_config(item, values, where: str = "recipe") -> ModelConfig:
    """A model entry: a reference (loaded with the recipe's dtype, device, ...) or a mapping of its own loading options."""
    if isinstance(item, dict):
        if "model" not in item:
            raise UserError(f"{where}: each entry of 'model' is a model reference or a mapping with a 'model' key; got {item!r}")
        own = options.from_mapping(item, ("model",), f"{where}: model")
        return settings.model_config(own, own.model[0])
    return settings.model_config(values, item)


def with_overrides(recipe: GridRecipe, model=None, data=None, seq_len=None, max_tokens=None) -> GridRecipe:
    """The same grid on other models or a smaller slice of text (command-line overrides)."""
    changes = {key: value for key, value in (("model", model), ("data", data), ("seq_len", seq_len), ("max_tokens", max_tokens)) if value}
    return dataclasses.replace(recipe, values=SimpleNamespace(**{**vars(recipe.values), **changes}))


NO_TEXT = "none"


def _check_text(reference: str, where: str) -> None:
    if reference not in TEXT_SOURCES and not Path(reference).expanduser().is_file():
        raise UserError(f"{where}: unknown text '{reference}': not a file; named corpora: {', '.join(TEXT_SOURCES)}")


def expand(recipe: GridRecipe, where: str = "recipe") -> list[Cell]:
    """Every cell, model by model (one load each), the baseline first in each text/window group.

    Everything a recipe can get wrong is checked here, before any model loads.
    """
    values = recipe.values
    calibration = settings.calibration(values)
    _check_text(calibration.data, f"{where}: calib_data")
    variants = settings.variants(values)
    tasks = settings.task_settings(values)
    if tasks is None and (NO_TEXT in values.data or values.no_ppl):
        raise UserError(f"{where}: 'data: {NO_TEXT}' (or no_ppl) measures no perplexity, and no 'tasks' are listed; nothing to measure")
    cells = []
    for model in recipe.models(where):
        model.validate()
        for data in values.data:
            if data == NO_TEXT or values.no_ppl:
                data = NO_TEXT
            else:
                _check_text(data, where)
            for seq_len in values.seq_len:
                text_config = settings.perplexity_config(values, data, seq_len)
                text_config.validate()
                cells.extend(Cell(model, text_config, variant, calibration, tasks, values.seed) for variant in variants)
    return cells

"""Evaluation recipes (``kind: grid`` YAML): schema, grid expansion into hashed cells, the cell cache, the runner."""

from massquant.recipes.grid import Cell
from massquant.recipes.schema import GridRecipe, expand, load_recipe

__all__ = ["Cell", "GridRecipe", "expand", "load_recipe"]

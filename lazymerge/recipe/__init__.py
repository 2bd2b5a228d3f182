"""The recipe: what to merge (spec.py, frozen data) and how YAML becomes it (parse.py)."""

from lazymerge.recipe.parse import load_recipe, parse_dtype, parse_recipe, parse_size
from lazymerge.recipe.spec import (
    DTYPE_LABELS,
    GradientRule,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    Recipe,
)

__all__ = [
    "DTYPE_LABELS",
    "GradientRule",
    "LoraSpec",
    "ModelSpec",
    "OutputSpec",
    "Recipe",
    "load_recipe",
    "parse_dtype",
    "parse_recipe",
    "parse_size",
]

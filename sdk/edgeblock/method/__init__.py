"""The method in PyTorch: patch sampling's use, block skipping, selection, LoRA, the training variants."""

from __future__ import annotations

import json
import os

from edge_runtime.recipe import PAPER, Recipe, recipe_named


def model_recipe(spec: str) -> Recipe:
    """The recommended recipe (edge_runtime.recipe) of a model: `builtin`, a pipeline or model directory, or a
    transformer config.json in one. A model names the recipe measured on it in its edgeblock.json ("recipe"; the
    built-in model's is "builtin"); a model without a measured one gets the paper's."""
    from ..models import builtin_dir

    path = builtin_dir() if spec == "builtin" else spec
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for d in (folder, os.path.dirname(folder)):
        meta = os.path.join(d, "edgeblock.json")
        if os.path.isfile(meta):
            with open(meta) as f:
                name = json.load(f).get("recipe")
            return recipe_named(name) if name else PAPER
    return PAPER

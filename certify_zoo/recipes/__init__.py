"""Conversion recipes: one TOML file per model family (sigma, optimiser, schedule, estimator, ...).

A recipe is chosen from the model's architecture (timm architecture name or transformers ``model_type``,
matched against each file's ``architectures`` / ``model_types`` patterns), or named with ``--recipe``.
Every key may be overridden on the command line; the settings actually used go into certify_zoo.json.

Keys that are not settings: ``description``, ``architectures``, ``model_types`` (what the recipe is for),
``image_size`` (the size it was designed at: the model's own input size is always used), ``differs_from_paper``
(the reason for each choice that is not the paper's), ``sigma_choices`` and ``[sigma_overrides."S"]`` (keys
that change when sigma is S).
"""
from __future__ import annotations

import fnmatch
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import CertifyZooError

RECIPE_DIR = Path(__file__).parent
AUTO = "auto"
FALLBACK = "generic"
# Recipes that are never chosen automatically (the demo is for the embedded 8x8 digits).
NOT_AUTOMATIC = ("demo", FALLBACK)
LR_SCALING_RULES = ("linear", "sqrt", "none")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name: str, sigma: float | None = None) -> dict[str, Any]:
    """The recipe's keys, with its ``sigma_overrides`` for ``sigma`` applied (the recipe's own sigma if None)."""
    path = RECIPE_DIR / f"{name}.toml"
    if not path.is_file():
        raise CertifyZooError(f"unknown recipe {name!r}: choose one of {', '.join(available_recipes())} "
                              "(list them with `certify-zoo recipes`)")
    with path.open("rb") as handle:
        recipe = tomllib.load(handle)
    recipe["name"] = name
    return apply_sigma_overrides(recipe, sigma)


def apply_sigma_overrides(recipe: dict[str, Any], sigma: float | None) -> dict[str, Any]:
    """Flatten ``[sigma_overrides."S"]`` for the chosen sigma into the recipe's top-level keys."""
    chosen = dict(recipe)
    overrides = chosen.pop("sigma_overrides", {})
    sigma = chosen.get("sigma") if sigma is None else sigma
    for key, values in overrides.items():
        if sigma is not None and math.isclose(float(key), sigma):
            chosen.update(values)
    return chosen


def recipe_for(architecture: str, model_type: str | None = None) -> str:
    """The recipe for a model: transformers ``model_type`` first (exact), then timm architecture name patterns."""
    architecture = architecture.lower().removeprefix("timm/").split(".")[0]
    candidates = [(name, _patterns(name)) for name in available_recipes() if name not in NOT_AUTOMATIC]
    if model_type:
        for name, (_, model_types) in candidates:
            if model_type.lower() in model_types:
                return name
    for name, (architectures, _) in candidates:
        if any(fnmatch.fnmatchcase(architecture, pattern) for pattern in architectures):
            return name
    return FALLBACK


def _patterns(name: str) -> tuple[list[str], list[str]]:
    recipe = load_recipe(name)
    return [p.lower() for p in recipe.get("architectures", [])], [t.lower() for t in recipe.get("model_types", [])]


def architecture_of(model: str) -> tuple[str, str | None]:
    """(architecture, model_type) of a MODEL spec without loading weights: a local folder's config.json
    (timm ``architecture``, transformers ``model_type``/``architectures``), else the name itself."""
    folder = Path(model).expanduser()
    config_file = folder / "config.json"
    if folder.is_dir() and config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError:
            config = {}
        architecture = config.get("architecture") or (config.get("architectures") or [""])[0]
        return str(architecture), config.get("model_type")
    return model.rstrip("/").split("/")[-1], None


@dataclass(frozen=True)
class RecipeChoice:
    name: str
    architecture: str
    model_type: str | None
    automatic: bool

    def describe(self) -> str:
        what = f"model_type {self.model_type}" if self.model_type else f"architecture {self.architecture}"
        how = f"chosen for {what}" if self.automatic else "--recipe"
        return f"recipe {self.name} ({how}; see `certify-zoo recipes show {self.name}`)"


def choose_recipe(model: str, requested: str = AUTO) -> RecipeChoice:
    """``--recipe auto`` -> the recipe for MODEL's architecture; any other name is checked and used as given."""
    architecture, model_type = architecture_of(model)
    if requested == AUTO:
        return RecipeChoice(recipe_for(architecture, model_type), architecture, model_type, True)
    load_recipe(requested)  # unknown names fail here, before anything is loaded
    return RecipeChoice(requested, architecture, model_type, False)


def recipe_text(name: str) -> str:
    """The recipe file as written (comments are where its reasons live)."""
    load_recipe(name)
    return (RECIPE_DIR / f"{name}.toml").read_text()


def scaled_learning_rate(lr: float, global_batch: int, reference_batch: int | None, rule: str) -> float:
    """lr stated at ``reference_batch`` images per optimiser step, scaled to ``global_batch`` by the recipe's rule.

    linear (Goyal et al. 2017, for SGD) keeps the update per image constant, sqrt suits Adam-type optimisers;
    either way a 1-GPU and an 8-GPU run of one recipe follow the same schedule per image.
    """
    if rule not in LR_SCALING_RULES:
        raise CertifyZooError(f"lr_scaling must be one of {', '.join(LR_SCALING_RULES)}, got {rule!r}")
    if rule == "none" or not reference_batch:
        return lr
    ratio = global_batch / reference_batch
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))

"""Conversion recipes: one TOML file per model family (sigma, optimiser, schedule, estimator, ...).

Each key may be overridden on the command line; the settings actually used go into certify_zoo.json.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import CertifyZooError

RECIPE_DIR = Path(__file__).parent


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name: str) -> dict[str, Any]:
    path = RECIPE_DIR / f"{name}.toml"
    if not path.is_file():
        raise CertifyZooError(f"unknown recipe {name!r}: choose one of {', '.join(available_recipes())}")
    with path.open("rb") as handle:
        recipe = tomllib.load(handle)
    recipe["name"] = name
    return recipe

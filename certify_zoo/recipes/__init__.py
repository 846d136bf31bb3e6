"""Conversion recipes: one TOML file per model family (sigma, optimiser, schedule, estimator, ...).

A recipe is chosen from the model's architecture (timm architecture name or transformers ``model_type``,
matched against each file's ``architectures`` / ``model_types`` patterns), or named with ``--recipe`` (a built-in
name, or the path to a TOML file of one's own: its name is the file's stem).
Every key may be overridden on the command line; the settings actually used go into certify_zoo.json.

Keys that are not settings: ``description``, ``architectures``, ``model_types`` (what the recipe is for),
``image_size`` (the size it was designed at: the model's own input size is always used), ``differs_from_paper``
(the reason for each choice that is not the paper's), ``sigma_choices`` and ``[sigma_overrides."S"]`` (keys
that change when sigma is S).
"""
from __future__ import annotations

import fnmatch
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import CertifyZooError, did_you_mean

RECIPE_DIR = Path(__file__).parent
AUTO = "auto"
FALLBACK = "generic"
# Recipes that are never chosen automatically (the demo is for the embedded 8x8 digits).
NOT_AUTOMATIC = ("demo", FALLBACK)
LR_SCALING_RULES = ("linear", "sqrt", "none")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def is_recipe_file(spec: str | Path) -> bool:
    """A recipe spec that names a TOML file of one's own rather than a built-in recipe."""
    return str(spec).endswith(".toml") or any(sep in str(spec) for sep in ("/", "\\"))


def recipe_path(spec: str | Path) -> Path:
    """The file behind a recipe spec: a built-in name (`certify-zoo recipes`) or a path to a TOML file."""
    if is_recipe_file(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise CertifyZooError(f"recipe file {spec} does not exist: pass a TOML file or a built-in recipe name "
                                  f"({', '.join(available_recipes())})")
        return path
    path = RECIPE_DIR / f"{spec}.toml"
    if not path.is_file():
        raise CertifyZooError(f"unknown recipe {spec!r}{did_you_mean(str(spec), available_recipes())}: choose one "
                              f"of {', '.join(available_recipes())} (list them with `certify-zoo recipes`), or pass a "
                              "path to a TOML file")
    return path


def load_recipe(spec: str | Path, sigma: float | None = None) -> dict[str, Any]:
    """The recipe's keys, with its ``sigma_overrides`` for ``sigma`` applied (the recipe's own sigma if None).

    ``spec`` is a built-in name or a TOML file; a file's recipe is named by its stem and may only use the keys
    that built-in recipes use (a misspelt key would otherwise be ignored without a word)."""
    path = recipe_path(spec)
    try:
        with path.open("rb") as handle:
            recipe = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise CertifyZooError(f"recipe {path} is not valid TOML: {exc}") from exc
    if path.parent != RECIPE_DIR:
        unknown = sorted(set(recipe) - known_recipe_keys())
        if unknown:
            named = ", ".join(key + did_you_mean(key, sorted(known_recipe_keys())) for key in unknown)
            raise CertifyZooError(f"recipe {path} has unknown {'key' if len(unknown) == 1 else 'keys'} {named}: the "
                                  f"keys recipes use are {', '.join(sorted(known_recipe_keys()))}")
    recipe["name"] = path.stem
    return apply_sigma_overrides(recipe, sigma)


# ConvertSettings fields that say how one run is driven, not how a model family converts: never in a recipe
RUN_ONLY_SETTINGS = ("model", "data", "out", "objective", "recipe", "overwrite", "resume", "revision", "record_seen",
                     "trust_remote_code", "image_column", "strict", "checkpoint_every", "checkpoint_minutes",
                     "keep_checkpoints", "seed")


def known_recipe_keys() -> set[str]:
    """Every key some built-in recipe uses, and every conversion setting a recipe may carry (e.g. penalty_share,
    which no built-in recipe sets)."""
    from ..conversion import ConvertSettings
    from ..objective import ObjectiveSettings

    keys = set(ObjectiveSettings.__dataclass_fields__)
    keys |= {key for key in ConvertSettings.__dataclass_fields__ if key not in RUN_ONLY_SETTINGS}
    for path in RECIPE_DIR.glob("*.toml"):
        with path.open("rb") as handle:
            keys |= set(tomllib.load(handle))
    return keys


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


def architecture_of(model: str, revision: str | None = None) -> tuple[str, str | None]:
    """(architecture, model_type) of a MODEL spec without loading weights: the config.json of a local folder or of a
    Hub repo (timm ``architecture``, transformers ``model_type``/``architectures``), else the timm name itself, as
    ``models.resolve_model_spec`` tells them apart. A Hub repo's name is its owner's choice ("alice/digits-v2"):
    guessing from it gave any such repo the generic recipe whatever its architecture."""
    from ..classifier import CONFIG_NAME
    from ..export import read_json
    from ..hub_files import hub_config
    from ..models import resolve_model_spec

    spec = resolve_model_spec(model, revision)
    if spec.kind == "timm":
        return spec.location, None
    if spec.kind.startswith("local-"):
        return _named_in(read_json(Path(spec.location) / CONFIG_NAME))
    return _named_in(hub_config(spec.location, revision))  # cached by resolve_model_spec's read of the same file


def _named_in(config: dict) -> tuple[str, str | None]:
    architecture = config.get("architecture") or (config.get("architectures") or [""])[0]
    return str(architecture), config.get("model_type")


@dataclass(frozen=True)
class RecipeChoice:
    name: str
    architecture: str
    model_type: str | None
    automatic: bool
    spec: str  # what load_recipe takes: the name of a built-in recipe or the path to a TOML file

    def describe(self) -> str:
        what = f"model_type {self.model_type}" if self.model_type else f"architecture {self.architecture}"
        how = f"chosen for {what}" if self.automatic else "--recipe"
        return f"recipe {self.name} ({how}; see `certify-zoo recipes show {self.spec}`)"


def choose_recipe(model: str, requested: str = AUTO, revision: str | None = None) -> RecipeChoice:
    """``--recipe auto`` -> the recipe for MODEL's architecture; any other name is checked and used as given."""
    if requested != AUTO:  # the model is not read: unknown names and bad files fail here, before any download
        return RecipeChoice(load_recipe(requested)["name"], "", None, False, str(requested))
    architecture, model_type = architecture_of(model, revision)
    name = recipe_for(architecture, model_type)
    return RecipeChoice(name, architecture, model_type, True, name)


def recipe_text(spec: str) -> str:
    """The recipe file as written (comments are where its reasons live)."""
    load_recipe(spec)
    return recipe_path(spec).read_text()


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

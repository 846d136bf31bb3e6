"""What leaves the machine: an output folder's records without the converting machine's local paths.

The records name where things were on this machine: the base model's folder, the data folder, the output folder,
image files. Locally they are needed as written: ``--resume`` compares the model and data of a run, and the card
finds the base model's record (to compare against it) through ``base_model``. So the folder keeps them, and
``push`` uploads copies in which every local path is a Hub id or a folder's name (``public_records``).
"""
from __future__ import annotations

import re
from pathlib import Path, PureWindowsPath
from typing import Any

from .export import CERTIFICATION_NAME, METADATA_NAME, read_json

AUDIT_NAME = "audit.json"
EVALUATION_RECORDS = (CERTIFICATION_NAME, AUDIT_NAME)  # they name the model evaluated and the data read
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
# An absolute path inside a longer text ("... in /home/me/x.png"); not URLs, fractions or "and/or".
_EMBEDDED_PATH = re.compile(r"(?<![\w.:/~\\-])(?:~|[A-Za-z]:)?[/\\](?:[\w.@+=-]+[/\\])+[\w.@+=-]*")
# huggingface_hub's cache layout: .../models--ORG--NAME/snapshots/<commit>/...
_HUB_CACHE = re.compile(r"models--([\w.-]+?)--([\w.-]+)[/\\]snapshots[/\\]")


def path_name(path: str) -> str:
    """The last component of a path, POSIX or Windows."""
    return PureWindowsPath(path.rstrip("/\\")).name or path


def is_local_path(text: str) -> bool:
    """A string that names a place on this machine rather than a Hub id, a timm name or a dataset spec."""
    if text == "demo" or text.startswith(("hf:", "hf-hub:")):
        return False
    return (text.startswith(("/", "~", "./", "../", "\\")) or bool(_WINDOWS_DRIVE.match(text))
            or Path(text).expanduser().exists())


def public_spec(spec: Any) -> Any:
    """A MODEL or DATA spec as published: Hub ids, timm names, ``hf:`` datasets and ``demo`` stay; a folder that
    huggingface_hub downloaded becomes its repo id; any other local path becomes its folder's (or file's) name."""
    if not isinstance(spec, str) or not is_local_path(spec):
        return spec
    cached = _HUB_CACHE.search(spec)
    return f"{cached.group(1)}/{cached.group(2)}" if cached else path_name(spec)


def public_text(text: str, roots: list[tuple[str, str]]) -> str:
    """A string with local paths replaced: a path under a known root keeps its part below the root, prefixed by
    the root's public name; any other absolute path becomes its last component."""
    for local, public in roots:
        if text == local or text.startswith(local + "/"):
            return public + text[len(local):]
    return _EMBEDDED_PATH.sub(lambda match: path_name(match.group(0)), text)


def public_value(value: Any, roots: list[tuple[str, str]]) -> Any:
    """A json value with every string made public (see ``public_text``)."""
    if isinstance(value, str):
        return public_text(value, roots)
    if isinstance(value, dict):
        return {key: public_value(item, roots) for key, item in value.items()}
    if isinstance(value, list):
        return [public_value(item, roots) for item in value]
    return value


def local_roots(folder: Path, metadata: dict, evaluated_on: list[Any]) -> list[tuple[str, str]]:
    """(local path, public name) of the places the records mention (the output, the base model, the data a
    conversion and evaluations read), each as written and as an absolute path, longest first so that a path is
    matched by its deepest known root."""
    settings = metadata.get("settings", {})
    named = [(str(folder), folder.name), (settings.get("out"), path_name(str(settings.get("out", "")))),
             *[(spec, public_spec(spec)) for spec in (metadata.get("base_model"), metadata.get("data"),
                                                        settings.get("check_data"), *evaluated_on)]]
    roots = {}
    for local, public in named:
        if isinstance(local, str) and local and public != local:
            for form in (local.rstrip("/\\"), str(Path(local).expanduser().resolve())):
                if len(form) > 1:
                    roots[form] = public
    return sorted(roots.items(), key=lambda item: -len(item[0]))


def public_records(folder: Path, repo_id: str | None = None) -> dict[str, Any]:
    """The json files of an output folder that name a local path, as they are published: file name -> record.

    The model a certification or audit record describes becomes ``repo_id`` (the repo it is pushed to), or the
    folder's name. Files without a local path are left out: they are published byte for byte."""
    folder = Path(folder).expanduser()
    originals = {path.name: read_json(path) for path in sorted(folder.glob("*.json"))}
    metadata = originals.get(METADATA_NAME, {})
    roots = local_roots(folder, metadata, [originals.get(name, {}).get("data") for name in EVALUATION_RECORDS])
    published = {}
    for name, original in originals.items():
        record = public_value(original, roots)
        if name in EVALUATION_RECORDS and "model" in record:
            record["model"] = repo_id or folder.name
        if record != original:
            published[name] = record
    return published

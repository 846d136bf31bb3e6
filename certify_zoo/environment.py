"""What a bug report needs (``certify-zoo env``): versions, devices, Accelerate's config, and where the caches live.

Everything is read locally: no network, no model or data loaded.
"""
from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__

LIBRARIES = ("torch", "timm", "accelerate", "datasets", "huggingface_hub", "transformers", "safetensors")
# The variables that move each cache, in the order the libraries read them.
CACHE_VARIABLES = {
    "Hugging Face home": ("HF_HOME", "XDG_CACHE_HOME"),
    "Hub cache (models)": ("HF_HUB_CACHE", "HF_HOME"),
    "datasets cache": ("HF_DATASETS_CACHE", "HF_HOME"),
    "certify-zoo cache (demo digits, checkpoint key, folder locks)": ("CERTIFY_ZOO_CACHE",),
    "torch hub (timm weights outside the Hub)": ("TORCH_HOME", "XDG_CACHE_HOME"),
}


def library_versions() -> dict[str, str | None]:
    """certify-zoo (the code running, not the installed metadata) and its main libraries; None: not installed."""
    versions: dict[str, str | None] = {"certify-zoo": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def devices() -> list[str]:
    import torch

    found = [f"cpu ({os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            found.append(f"cuda:{index} {properties.name} ({properties.total_memory / 2**30:.0f} GiB, CUDA "
                         f"{torch.version.cuda})")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def accelerate_config() -> dict[str, Any]:
    """The default config `accelerate config` wrote, if any (what `accelerate launch` uses without --config_file)."""
    from accelerate.commands.config.config_args import default_config_file

    path = Path(default_config_file).expanduser()
    if not path.is_file():
        return {"file": str(path), "exists": False}
    import yaml

    with path.open() as handle:
        return {"file": str(path), "exists": True, "settings": yaml.safe_load(handle) or {}}


def cache_paths() -> dict[str, dict[str, Any]]:
    """Each cache's folder and the variables that move it (with the value of those that are set)."""
    from huggingface_hub import constants

    from .security import cache_root

    try:
        from datasets import config as datasets_config

        datasets_cache = str(datasets_config.HF_DATASETS_CACHE)
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets_cache = None
    import torch.hub

    folders = {"Hugging Face home": constants.HF_HOME, "Hub cache (models)": constants.HF_HUB_CACHE,
               "datasets cache": datasets_cache,
               "certify-zoo cache (demo digits, checkpoint key, folder locks)": str(cache_root()),
               "torch hub (timm weights outside the Hub)": torch.hub.get_dir()}
    return {name: {"path": folders[name], "moved_by": list(variables),
                   "set": {v: os.environ[v] for v in variables if v in os.environ}, **room(folders[name])}
            for name, variables in CACHE_VARIABLES.items()}


def room(folder: str | None) -> dict[str, Any]:
    """Whether a cache can be written and the space left on its disk: a full or read-only cache fails a download, a
    checkpoint or the demo, and a report that says so saves a round trip."""
    from .export import can_write_in, nearest_existing

    if folder is None:
        return {}
    try:
        free = shutil.disk_usage(nearest_existing(Path(folder))).free
    except OSError:
        free = None
    return {"writable": can_write_in(Path(folder)), "free_bytes": free}


def environment() -> dict[str, Any]:
    return {"versions": library_versions(), "python": platform.python_version(), "platform": platform.platform(),
            "devices": devices(), "accelerate_config": accelerate_config(), "caches": cache_paths(),
            "offline": os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")}


def environment_lines(env: dict[str, Any]) -> list[str]:
    """The report as plain lines, to paste into an issue."""
    versions = env["versions"]
    lines = [f"certify-zoo {versions['certify-zoo']}, Python {env['python']} on {env['platform']}"]
    lines += [f"  {name}: {version or 'not installed'}" for name, version in versions.items() if name != "certify-zoo"]
    lines.append("devices: " + "; ".join(env["devices"]))
    config = env["accelerate_config"]
    if config["exists"]:
        settings = ", ".join(f"{k}={v}" for k, v in config["settings"].items() if not isinstance(v, dict))
        lines.append(f"accelerate config: {config['file']} ({settings})")
    else:
        lines.append(f"accelerate config: none at {config['file']} (defaults: one process; `accelerate config`)")
    lines.append(f"Hub offline (HF_HUB_OFFLINE): {'yes' if env['offline'] else 'no'}")
    lines.append("caches:")
    for name, cache in env["caches"].items():
        moved = ", ".join(f"{v}={cache['set'][v]}" if v in cache["set"] else v for v in cache["moved_by"])
        room = "" if cache.get("writable", True) else "; cannot be written"
        free = cache.get("free_bytes")
        if free is not None:
            room += f"; {free / 2**30:.1f} GiB free" if free >= 2**30 else f"; {free / 2**20:.0f} MiB free"
        lines.append(f"  {name}: {cache['path']}  (moved by {moved}{room})")
    return lines

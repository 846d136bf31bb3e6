"""The dependency floors that pyproject.toml declares are the ones `FLOORS=1 .ci/run` tests (.ci/floors.txt)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from packaging.version import Version

from conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared_floors() -> dict[str, Version]:
    """name -> the version after '>=' of every runtime and test requirement (the test tools themselves aside)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    floors = {}
    for requirement in requirements:
        floor = re.search(r">=\s*([\w.]+)", requirement)
        if floor and _name(requirement) not in ("pytest", "pytest-xdist", "tomli"):
            floors[_name(requirement)] = Version(floor.group(1))
    return floors


def pinned() -> dict[str, Version]:
    lines = (REPO / ".ci" / "floors.txt").read_text().splitlines()
    pins = [line.split("#")[0].strip() for line in lines]
    return {_name(pin): Version(pin.split("==")[1]) for pin in pins if "==" in pin}


def test_every_declared_floor_is_the_version_the_floor_run_installs():
    floors, pins = declared_floors(), pinned()
    assert len(floors) >= 15 and "torch" in floors and "transformers" in floors  # the parse found them
    assert {name: pins.get(name) for name in floors} == floors
    # what else is pinned is named in the file as not ours (numpy, pyarrow), not a floor pyproject forgot
    assert set(pins) - set(floors) == {"numpy", "pyarrow"}


def test_the_code_passes_ruff():
    """pyflakes' findings and lines within 120 characters, as pyproject.toml's [tool.ruff] selects them (the dev
    extra installs ruff; the floor run, without it, skips this)."""
    pytest.importorskip("ruff")
    found = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True,
                           text=True, cwd=REPO)
    assert found.returncode == 0, found.stdout[-3000:] + found.stderr[-1000:]

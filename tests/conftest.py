"""Shared fixtures: real (small) data and models, built once per test session, all offline."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_WORKERS = 4  # each worker builds the session's models and data again, and holds its own copy of them
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

# Set before torch starts (in the workers and every subprocess they run): pytest-xdist runs one worker per core,
# and torch's own default (a thread per core in each) would put workers x cores threads on the cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most MAX_WORKERS."""
    return max(1, min(MAX_WORKERS, CORES))


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory):
    """Every test runs offline, with its own Hugging Face and certify-zoo caches."""
    root = tmp_path_factory.mktemp("caches")
    env = {"CERTIFY_ZOO_CACHE": str(root / "certify-zoo"), "HF_HOME": str(root / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield root
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def demo_data(offline_cache) -> Path:
    """scikit-learn's digits as PNG class folders: <root>/train/<digit>/*.png and <root>/test/<digit>/*.png."""
    from certify_zoo.data import demo_folder

    return demo_folder()


@pytest.fixture(scope="session")
def demo_base(demo_data, tmp_path_factory) -> Path:
    """The demo's base classifier (tiny timm ViT, ~96% on held-out digits), saved in timm format."""
    from certify_zoo.demo import train_demo_base

    return train_demo_base(tmp_path_factory.mktemp("models") / "base", epochs=20)


@pytest.fixture(scope="session")
def short_conversion(demo_base, tmp_path_factory) -> Path:
    """A 30-step conversion of the demo base: a real output folder, cheap enough for every test that needs one.

    Gentle settings (gamma 2, lr 0.005, half the steps warming up): 30 steps are too few to recover from the
    demo recipe's full penalty, which needs its 880 steps."""
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe

    out = tmp_path_factory.mktemp("converted") / "out"
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                        max_steps=30, gamma=2.0, lr=0.005, warmup=0.5))
    return out


def copy_with_kappa(conversion: Path, folder: Path, kappa: float) -> Path:
    """A copy of a conversion whose stored calibration is ``kappa`` at temperature 1: 30 gentle steps leave the short
    conversion without a deterministic radius (kappa 0), and tests of calibrated radii need some."""
    import json
    import shutil

    shutil.copytree(conversion, folder)
    metadata = json.loads((folder / "certify_zoo.json").read_text())
    metadata["calibration"] = {**metadata["calibration"], "kappa": kappa, "temperature": 1.0}
    (folder / "certify_zoo.json").write_text(json.dumps(metadata))
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (other torchrun jobs may share the machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def error_line(stderr: str) -> str:
    """The one error line of a failed command: the last line on stderr (log lines may come before it: logs go to
    stderr too), the only one that starts with Error:, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error:"), stderr
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:] and "Traceback" not in stderr, stderr
    return lines[-1]


def card_usage_logits(output: Path, image):
    """Run the first code block under the card's 'How to use it' (plain timm or plain transformers) as a user
    would, with the PIL ``image`` in scope; returns the ``logits`` it computes."""
    card = (Path(output) / "README.md").read_text()
    code = card.split("## How to use it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope = {"image": image}
    exec(code, scope)  # the code of the card certify-zoo wrote
    return scope["logits"]


def sigterm_at_call(function, call: int):
    """`function` that sends this process SIGTERM at its `call`-th call (1 = the first), before doing its work: the
    signal lands where a scheduler's would, inside a step or a batch."""
    calls = [0]

    def terminated(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return function(*args, **kwargs)
    return terminated


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None,
            largest_file: int | None = None) -> subprocess.CompletedProcess:
    """The real command line in a subprocess (exit codes, stderr, no traceback), using this checkout.

    ``largest_file``: bytes the subprocess may write to one file (RLIMIT_FSIZE): the OS then cuts a longer write
    short, as a full disk does, and torch, safetensors and Python report it in their own words (no root needed to
    mount a small file system)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}

    def limit_file_size() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of the process being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest_file, largest_file))
    return subprocess.run([sys.executable, "-m", "certify_zoo", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600,
                          preexec_fn=limit_file_size if largest_file is not None else None)


@pytest.fixture(scope="session")
def render():
    """scripts/render_docs.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("render_docs", REPO / "scripts" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module

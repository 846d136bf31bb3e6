"""Streamed data (`datasets` IterableDataset) gives the same right answers as a folder: positions, labels, resume."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from tiny_sources import digits_parquet


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_stream(demo_data, tmp_path_factory) -> Path:
    """The demo's training digits as 3 parquet shards."""
    return digits_parquet(tmp_path_factory.mktemp("stream") / "train", demo_data)


def _stream_settings(base: Path, data: Path, out: Path, resume: bool = False, **extra):
    from certify_zoo.convert import ConvertSettings
    from certify_zoo.recipes import load_recipe

    return ConvertSettings.from_recipe(load_recipe("demo"), model=str(base), data=str(data), out=str(out),
                                       max_steps=8, batch_size=16, reps=1, seed=5, checkpoint_every=2,
                                       checkpoint_minutes=0, resume=resume, **extra)


def test_resume_on_a_stream_today(demo_base, digits_stream, tmp_path, monkeypatch):
    """What --resume on a streamed conversion does before issue 20: it cannot continue at all (accelerate's
    skip_first_batches expects a DataLoader and receives our StreamLoader)."""
    import certify_zoo.convert as convert_module
    from certify_zoo.convert import convert
    from certify_zoo.errors import ConversionInterrupted

    real, calls = convert_module.boot_camp_step, [0]

    def terminated_at_step_5(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "boot_camp_step", terminated_at_step_5)
    with pytest.raises(ConversionInterrupted, match="stopped by SIGTERM at step 5 of 8"):
        convert(_stream_settings(demo_base, digits_stream, tmp_path / "out"))
    monkeypatch.setattr(convert_module, "boot_camp_step", real)
    with pytest.raises(AttributeError, match="'StreamLoader' object has no attribute 'dataset'"):
        convert(_stream_settings(demo_base, digits_stream, tmp_path / "out", resume=True))

"""The demo's voices and rendering (speechlm/demo/render.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechlm.demo import render as r


def test_held_out_voices() -> None:
    train, test = r.voices(held_out=False), r.voices(held_out=True)
    assert len(train) > 100 and len(test) > 20
    assert not set(train) & set(test)


def test_natural_fraction_sends_that_share_of_sentences_to_pico_voices(tmp_path: Path) -> None:
    items = [(f"sentence {i}", "synthetic") for i in range(400)]
    jobs = r.render_jobs(items, ["en-us"], tmp_path, "train", 0, r.PICO_VOICES, 0.3)
    share = sum(job.voice.startswith("pico:") for job in jobs) / len(jobs)
    assert 0.22 < share < 0.38
    assert all(job.voice == "en-us" for job in r.render_jobs(items, ["en-us"], tmp_path, "train", 0))


@pytest.mark.skipif(shutil.which("pico2wave") is None, reason="needs Debian libttspico-utils")
def test_pico_voice_renders_16k_speech(tmp_path: Path) -> None:
    job = r.RenderJob("turn on the kitchen lights", "pico:en-GB", 190, 50, tmp_path / "a.wav")
    seconds = r.render(job)
    audio, rate = sf.read(job.path)
    assert rate == 16_000 and 0.8 < seconds < 4 and np.abs(audio).max() > 0.05
    assert not list(tmp_path.glob("*.pico.wav"))  # the raw 16 kHz file is removed

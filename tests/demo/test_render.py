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


def test_voice_perturbation_keeps_texts_and_voices_and_spreads_rates(tmp_path: Path) -> None:
    items = [(f"sentence {i}", "synthetic") for i in range(200)]
    plain = r.render_jobs(items, r.voices(held_out=False), tmp_path, "train", 0)
    perturbed = r.render_jobs(items, r.voices(held_out=False), tmp_path, "train", 0, perturbation=0.1)
    def spoken(jobs: list[r.RenderJob]) -> list[tuple]:
        return [(j.text, j.voice, j.speed, j.pitch) for j in jobs]

    assert spoken(perturbed) == spoken(plain)
    rates = [j.rate_factor for j in perturbed]
    assert all(0.9 <= rate <= 1.1 for rate in rates) and min(rates) < 0.95 and max(rates) > 1.05
    assert {j.rate_factor for j in plain} == {1.0}


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian espeak-ng")
def test_rate_factor_plays_the_clip_back_faster(tmp_path: Path) -> None:
    plain = r.RenderJob("set an alarm for seven thirty", "en-us", 160, 50, tmp_path / "a.wav")
    faster = r.RenderJob("set an alarm for seven thirty", "en-us", 160, 50, tmp_path / "b.wav", rate_factor=1.25)
    assert r.render(faster) == pytest.approx(r.render(plain) / 1.25, rel=0.01)


def test_voice_group_tells_the_held_out_accent_from_new_voices_of_trained_accents() -> None:
    groups = {r.voice_group(voice) for voice in r.voices(held_out=True) if voice.startswith("en-029")}
    others = {r.voice_group(voice) for voice in r.voices(held_out=True) if not voice.startswith("en-029")}
    assert len(groups) == len(others) == 1 and groups != others

"""Simulated accents for training sentences (speechlm/demo/accents.py)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechlm.demo import accents as a
from speechlm.demo import render as r

# "three thirty with the hotel and friends" as espeak-ng en-us writes it with -x --sep=.
PHONEMES = "T.r.'i: T.'3:.t#.i w.I.D.D.@2 h.oU.t.'E.l a.n.d f.r.'E.n.d.z"


def test_a_process_rewrites_every_occurrence() -> None:
    assert a.rewrite(PHONEMES, ("th-stopping",)) == "tr'i: t'3:t#i wIdd@2 hoUt'El and fr'Endz"


def test_the_first_process_that_applies_wins() -> None:
    assert a.rewrite("T.r.'i:", ("th-fronting", "th-stopping")) == "fr'i:"


def test_final_devoicing_changes_only_the_last_phoneme_of_a_word() -> None:
    assert a.rewrite("d.'O:.g z.u: d.'I.z", ("final-devoicing",)) == "d'O:k zu: d'Is"


def test_cluster_reduction_drops_a_final_stop_only_after_a_consonant() -> None:
    assert a.rewrite(PHONEMES, ("cluster-reduction",)).split()[-2:] == ["an", "fr'Endz"]
    assert a.rewrite("l.'I.s.t s.'E.t", ("cluster-reduction",)) == "l'Is s'Et"


def test_a_dropped_stressed_phoneme_passes_its_stress_on() -> None:
    assert a.rewrite("'h.oU.m", ("h-dropping",)) == "'oUm"


def test_an_accent_is_a_random_subset_of_the_processes() -> None:
    rng = random.Random(0)
    accents = [a.sample_accent(rng, 0.3) for _ in range(300)]
    assert all(set(accent) <= set(a.ALL_PROCESSES) for accent in accents)
    assert 2.5 < np.mean([len(accent) for accent in accents]) < 4.1
    assert len(set(accents)) > 100


def test_accent_fraction_gives_that_share_of_clips_an_accent_and_keeps_texts_and_voices() -> None:
    items = [(f"sentence {i}", "synthetic") for i in range(400)]
    plain = r.render_jobs(items, r.voices(held_out=False), Path("x"), "train", 0)
    accented = r.render_jobs(items, r.voices(held_out=False), Path("x"), "train", 0, accent_fraction=0.5)
    assert [(j.text, j.voice) for j in accented] == [(j.text, j.voice) for j in plain]
    assert 0.42 < sum(bool(j.accent) for j in accented) / len(accented) < 0.58


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian espeak-ng")
def test_an_accented_clip_is_speech_and_differs_from_the_plain_one(tmp_path: Path) -> None:
    text = "three thirty with the hotel"
    plain = r.RenderJob(text, "en-us", 160, 50, tmp_path / "a.wav")
    accented = r.RenderJob(text, "en-us", 160, 50, tmp_path / "b.wav", accent=("th-stopping", "h-dropping"))
    r.render(plain), r.render(accented)
    a_audio, b_audio = sf.read(plain.path)[0], sf.read(accented.path)[0]
    assert np.abs(b_audio).max() > 0.05 and 0.7 < len(b_audio) / len(a_audio) < 1.3
    assert len(a_audio) != len(b_audio) or not np.allclose(a_audio, b_audio)

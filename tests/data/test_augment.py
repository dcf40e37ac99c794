"""Fixed waveform augmentation (`speechlm.data.augment`): each transform does what its name says, the same spec
always gives the same audio, bad specs fail naming the spec, and an augmented copy is its own cached clip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speechlm.data.augment import augment_audio, parse_augment
from speechlm.data.dataset import SpeechLMDataset
from speechlm.data.encoder_cache import EncoderCache
from speechlm.data.manifests import ManifestError, read_manifest

RATE = 16_000


def tone(hz: float, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def band_energy(audio: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    frequencies = np.fft.rfftfreq(audio.size, 1 / RATE)
    return float(spectrum[(frequencies >= low) & (frequencies <= high)].sum())


def test_the_same_spec_gives_the_same_audio_and_another_seed_other_noise():
    clip = tone(440)
    first = augment_audio(clip, RATE, "reverb=0.3,noise=20,seed=3")
    assert np.array_equal(first, augment_audio(clip, RATE, "reverb=0.3,noise=20,seed=3"))
    assert not np.array_equal(first, augment_audio(clip, RATE, "reverb=0.3,noise=20,seed=4"))


def test_speed_perturbation_shortens_a_faster_clip_and_raises_its_pitch():
    faster = augment_audio(tone(440), RATE, "speed=1.1")
    assert abs(faster.size - RATE / 1.1) <= 2
    peak = np.fft.rfftfreq(faster.size, 1 / RATE)[np.argmax(np.abs(np.fft.rfft(faster)))]
    assert abs(peak - 484) < 3


def test_noise_is_added_at_the_requested_signal_to_noise_ratio():
    clip = tone(440)
    noisy = augment_audio(clip, RATE, "noise=20,seed=1")
    snr = 10 * np.log10(np.mean(clip.astype(np.float64) ** 2) / np.mean((noisy - clip).astype(np.float64) ** 2))
    assert abs(snr - 20) < 0.3


def test_the_telephone_channel_keeps_the_voice_band_and_drops_what_lies_outside_it():
    voice, treble, hum = tone(1000), tone(5000), tone(100)
    for clip, kept in ((voice, True), (treble, False), (hum, False)):
        phone = augment_audio(clip, RATE, "telephone")
        assert phone.size == clip.size
        ratio = band_energy(phone, 0, RATE / 2) / band_energy(clip, 0, RATE / 2)
        assert ratio > 0.8 if kept else ratio < 0.01


def test_reverb_keeps_length_and_peak_and_adds_a_decaying_tail():
    impulse = np.zeros(RATE, dtype=np.float32)
    impulse[100] = 0.5
    wet = augment_audio(impulse, RATE, "reverb=0.4")
    assert wet.size == impulse.size and np.isclose(np.abs(wet).max(), 0.5)
    tail = np.abs(wet[101:])
    early, late = tail[: RATE // 10].mean(), tail[int(0.3 * RATE) : int(0.4 * RATE)].mean()
    assert early > 0 and late < early / 10


@pytest.mark.parametrize("spec, problem", [("echo=2", "unknown transform 'echo'"),
                                           ("speed=fast", "speed needs a number"),
                                           ("speed=3", r"speed must be in \[0.5, 2\]"),
                                           ("seed=1.5", "seed must be an integer")])
def test_a_bad_spec_fails_naming_the_spec_and_the_problem(spec, problem):
    with pytest.raises(ValueError, match=rf"augment '{spec}': {problem}"):
        parse_augment(spec)


def test_a_manifest_row_with_a_bad_augment_is_reported_with_its_line(corpus):
    root, manifest, rows = corpus
    manifest.write_text(json.dumps({**rows[0], "augment": "speed=1.1"}) + "\n"
                        + json.dumps({**rows[1], "augment": "noise=loud"}) + "\n")
    with pytest.raises(ManifestError, match=r"train.jsonl:2: augment 'noise=loud': noise needs a number"):
        read_manifest(manifest)


def test_an_augmented_record_loads_augmented_and_is_its_own_cached_clip(corpus):
    _, manifest, rows = corpus
    manifest.write_text("".join(json.dumps(row) + "\n" for row in [rows[0], {**rows[0], "augment": "speed=1.1"}]))
    clean, augmented = read_manifest(manifest)
    assert augmented["augment"] == "speed=1.1" and clean["augment"] is None
    dataset = SpeechLMDataset([clean, augmented], RATE)
    assert np.array_equal(dataset.load_audio(1), augment_audio(dataset.load_audio(0), RATE, "speed=1.1"))
    cache = EncoderCache("encoder")
    assert cache.key(clean) != cache.key(augmented)
    assert cache.key(clean) == cache.key({**clean, "augment": None})  # clean clips keep the keys they had
    cache.put(cache.key(clean), torch.zeros(2, 4))
    assert "cache_key" in SpeechLMDataset([clean, augmented], RATE, encoder_cache=cache)[0]
    assert "audio" in SpeechLMDataset([clean, augmented], RATE, encoder_cache=cache)[1]

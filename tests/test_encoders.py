"""Encoder adapters: the too-short error every family gives, audio input validation, the exact Whisper feature
extractor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from speechlm.encoders import (
    AudioTooShortError,
    ExactWhisperFeatureExtractor,
    exact_feature_extractor,
    validated_audio_lengths,
)
from tests.tiny_models import ENCODERS


@pytest.mark.parametrize("encoder", ENCODERS)
def test_a_clip_shorter_than_the_receptive_field_is_a_named_value_error(build, encoder):
    """Whisper used to fail inside the STFT with a bare torch RuntimeError."""
    processor, model = build(encoder, "qwen2")
    clips = [np.random.default_rng(0).standard_normal(n).astype(np.float32) for n in (4000, 150)]
    with pytest.raises(AudioTooShortError, match=r"audio clip\(s\) \[1\] have \[150\] samples, shorter than the "
                                                 r"encoder's receptive field") as caught:
        batch = processor(clips)
        model.generate(**batch, max_new_tokens=2)
    assert isinstance(caught.value, ValueError) and caught.value.clips == [1]


def test_the_minimum_is_just_enough(build):
    processor, model = build("whisper", "qwen2")
    clip = np.random.default_rng(0).standard_normal(201).astype(np.float32)  # n_fft // 2 + 1
    assert model.generate(**processor([clip]), max_new_tokens=2).shape[0] == 1



def test_the_minimum_length_is_computed_once_per_model_not_per_call(build, monkeypatch):
    """The minimum counts up sample by sample through the conv arithmetic: hundreds of tiny ops that must not run in
    every forward and generate."""
    _, model = build("wav2vec2-layer", "qwen2")
    adapter, calls = model.adapter, []
    arithmetic = adapter.output_lengths
    monkeypatch.setattr(adapter, "output_lengths", lambda *args: calls.append(1) or arithmetic(*args))
    audio, mask = torch.randn(2, 8000), torch.ones(2, 8000, dtype=torch.long)
    lengths = validated_audio_lengths(adapter, model.audio_tower, audio, mask)
    first = len(calls)
    assert first > 1 and lengths.tolist() == [8000, 8000]  # the first call does count up to the minimum
    for _ in range(3):
        validated_audio_lengths(adapter, model.audio_tower, audio, mask)
    assert len(calls) == first
    per_generate = []
    for _ in range(2):
        calls.clear()
        model.generate(input_values=audio, attention_mask=mask, max_new_tokens=1)
        per_generate.append(len(calls))
    # A pass converts lengths a couple of times (encode, frame counts) but never counts up to the minimum again.
    assert per_generate[0] == per_generate[1] <= 3


def test_validation_checks_every_clip_and_returns_the_real_lengths(build):
    _, model = build("wav2vec2-layer", "qwen2")
    adapter, encoder = model.adapter, model.audio_tower
    minimum = adapter.min_input_length(encoder)
    audio = torch.randn(3, 8000)
    mask = torch.zeros(3, 8000, dtype=torch.long)
    for row, length in enumerate((8000, 5000, minimum)):
        mask[row, :length] = 1
    audio[1, 6000:] = float("nan")  # past clip 1's end: padding may hold anything
    assert validated_audio_lengths(adapter, encoder, audio, mask).tolist() == [8000, 5000, minimum]
    assert validated_audio_lengths(adapter, encoder, audio[:1], None).tolist() == [8000]
    audio[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or inf values in clip\(s\) \[2\]"):
        validated_audio_lengths(adapter, encoder, audio, mask)
    mask[0, minimum - 1 :] = 0
    with pytest.raises(AudioTooShortError, match=rf"\[0\] have \[{minimum - 1}\] samples") as caught:
        validated_audio_lengths(adapter, encoder, audio.nan_to_num(), mask)
    assert caught.value.minimum == minimum
    with pytest.raises(ValueError, match=r"attention_mask for input_values must have shape \(3, 8000\)"):
        validated_audio_lengths(adapter, encoder, audio, mask[:, :10])


def test_whisper_validation_names_the_position_table_limit(build):
    _, model = build("whisper", "qwen2")
    features = torch.randn(2, 16, 3002)
    mask = torch.ones(2, 3002, dtype=torch.long)
    mask[0, 3000:] = 0
    with pytest.raises(ValueError, match="has 3002 frames but this encoder's position table holds at most 3000"):
        validated_audio_lengths(model.adapter, model.audio_tower, features, mask)
    mask[1, 3000:] = 0
    assert validated_audio_lengths(model.adapter, model.audio_tower, features, mask).tolist() == [3000, 3000]

def test_exact_whisper_extractor_marks_each_clip_as_alone_and_saves_as_the_plain_one(tmp_path):
    stock = WhisperFeatureExtractor(feature_size=16)
    exact = exact_feature_extractor(stock)
    assert type(exact) is ExactWhisperFeatureExtractor
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) for n in (9000, 12800, 4000)]
    kwargs = {"sampling_rate": 16000, "padding": True, "return_attention_mask": True, "return_tensors": "pt"}
    assert stock(clips, **kwargs)["attention_mask"][0].sum() == 57  # the stock batch: one frame too many
    batch = exact(clips, **kwargs)
    for index, clip in enumerate(clips):
        alone = stock(clip, sampling_rate=16000, padding="longest", return_tensors="pt")["input_features"][0]
        frames = alone.shape[-1]
        assert int(batch["attention_mask"][index].sum()) == frames
        assert torch.equal(batch["input_features"][index, :, :frames], alone)
    assert frames == 25 and batch["attention_mask"][0].sum() == 56
    exact.save_pretrained(tmp_path)
    assert type(WhisperFeatureExtractor.from_pretrained(tmp_path)) is WhisperFeatureExtractor
    from transformers import AutoFeatureExtractor

    assert type(AutoFeatureExtractor.from_pretrained(tmp_path)) is WhisperFeatureExtractor

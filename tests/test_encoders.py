"""Encoder adapters: the too-short error every family gives, the exact Whisper feature extractor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from speechlm.encoders import AudioTooShortError, ExactWhisperFeatureExtractor, exact_feature_extractor
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

"""Sequence limits: audio + prompt + new tokens are checked against the LLM's positions before any work is done
(`speechlm.inference.decoding`)."""

from __future__ import annotations

import numpy as np
import pytest

from speechlm.inference.decoding import audio_positions, position_limit, prompt_positions, transcribe_arrays
from tests.conftest import make_clips


@pytest.mark.parametrize("encoder", ["whisper", "wav2vec2-layer"])
def test_audio_positions_match_the_merged_sequence(build, encoder):
    processor, model = build(encoder, "qwen2")
    for samples in (1600, 8000, 12345, 16001, 400000):
        batch = processor([np.full(samples, 0.01, dtype=np.float32)])
        merged = model.prepare_inputs(**batch)
        prompt = prompt_positions(processor)
        assert audio_positions(model, processor, samples) + prompt == int(merged.attention_mask.sum()), samples


def test_position_limit_reads_the_llm_config(whisper_gpt2):
    _, model = whisper_gpt2
    assert position_limit(model) == 512


def test_long_prompt_is_a_clear_value_error(whisper_gpt2):
    processor, model = whisper_gpt2
    clip = make_clips((1.0,))[0]
    expected = r"clip 0: audio \(15 positions\) \+ prompt \(\d+ tokens\).*exceeds the LLM's 512"
    with pytest.raises(ValueError, match=expected):
        transcribe_arrays(model, processor, [clip], prompt="x " * 600, max_new_tokens=4)


def test_too_many_new_tokens_is_a_clear_value_error(whisper_gpt2):
    processor, model = whisper_gpt2
    clip = make_clips((1.0,))[0]
    with pytest.raises(ValueError, match=r"max_new_tokens \(500\).*exceeds the LLM's 512 positions"):
        transcribe_arrays(model, processor, [clip], max_new_tokens=500)


def test_what_fits_the_positions_still_decodes(whisper_gpt2):
    processor, model = whisper_gpt2
    assert isinstance(transcribe_arrays(model, processor, make_clips((1.0,)), max_new_tokens=4)[0], str)

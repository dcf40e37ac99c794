"""Sequence limits: audio + prompt + new tokens are checked against the LLM's positions before any work is done;
unset decoding options come from the model's generation config (`speechlm.inference.decoding`)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from speechlm import SpeechLMModel, SpeechLMProcessor, create_speech_lm_model
from speechlm.configuration import DEFAULT_GENERATION
from speechlm.inference.decoding import (
    LENGTH_CAP_MARGIN,
    audio_positions,
    default_generation_kwargs,
    length_cap,
    new_token_budget,
    position_limit,
    prompt_positions,
    saved_generation_settings,
    transcribe_arrays,
)
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


# ------------------------------------------------------------------------------------------ length caps
def test_length_cap_is_rate_times_seconds_plus_margin_within_the_budget():
    assert length_cap(2.0, 5.0) == 10 + LENGTH_CAP_MARGIN
    assert length_cap(0.3, 5.0) == 2 + LENGTH_CAP_MARGIN  # rounded up
    assert length_cap(60.0, 5.0, budget=64) == 64


def test_each_clip_gets_its_own_length_cap_whatever_its_batch_mates(whisper_gpt2):
    # A one-second clip batched with a four-second one must stop where it stops alone.
    processor, model = whisper_gpt2
    clips = make_clips((1.0, 4.0))
    forced = {"min_new_tokens": 40, "max_new_tokens": 40}  # a random model: never stops on its own
    together = transcribe_arrays(model, processor, clips, tokens_per_second=3.0, **forced)
    for clip, text in zip(clips, together):
        cap = length_cap(len(clip) / processor.sampling_rate, 3.0)
        alone = transcribe_arrays(model, processor, [clip], min_new_tokens=40, max_new_tokens=cap)
        assert text == alone[0]
    assert len(together[0]) < len(together[1])


def test_a_non_positive_token_rate_is_a_value_error(whisper_gpt2):
    processor, model = whisper_gpt2
    with pytest.raises(ValueError, match="tokens_per_second must be > 0"):
        transcribe_arrays(model, processor, make_clips((1.0,)), tokens_per_second=0)


# ------------------------------------------------------------------------------------------ several answers
def test_each_clip_gets_its_beams_best_first_the_first_being_its_single_answer(whisper_gpt2):
    processor, model = whisper_gpt2
    clips, options = make_clips((1.0, 2.5, 1.7)), {"num_beams": 3, "max_new_tokens": 6, "min_new_tokens": 6}
    single = transcribe_arrays(model, processor, clips, **options)
    beams = transcribe_arrays(model, processor, clips, num_return_sequences=3, batch_size=2, **options)
    assert [len(candidates) for candidates in beams] == [3, 3, 3]
    assert [candidates[0] for candidates in beams] == single


def test_each_clips_beams_keep_its_own_length_cap(whisper_gpt2):
    processor, model = whisper_gpt2
    clips, options = make_clips((1.0, 4.0)), {"num_beams": 2, "min_new_tokens": 40, "max_new_tokens": 40}
    together = transcribe_arrays(model, processor, clips, num_return_sequences=2, tokens_per_second=3.0, **options)
    alone = [transcribe_arrays(model, processor, [clip], num_return_sequences=2, tokens_per_second=3.0, **options)[0]
             for clip in clips]
    assert together == alone


def test_more_answers_than_beams_is_a_clear_value_error(whisper_gpt2):
    processor, model = whisper_gpt2
    with pytest.raises(ValueError, match=r"num_return_sequences=4 needs num_beams >= 4.*got num_beams=2"):
        transcribe_arrays(model, processor, make_clips((1.0,)), num_return_sequences=4, num_beams=2)


def test_no_answers_at_all_is_a_clear_value_error(whisper_gpt2):
    processor, model = whisper_gpt2
    with pytest.raises(ValueError, match="num_return_sequences must be >= 1, got 0"):
        transcribe_arrays(model, processor, make_clips((1.0,)), num_return_sequences=0)


# ------------------------------------------------------------------------------------------ generation config
def test_unset_options_come_from_the_generation_config_then_the_fallback(build):
    _, model = build("wav2vec2-layer", "qwen2")
    model.generation_config.update(max_new_tokens=3, num_beams=2, no_repeat_ngram_size=0, temperature=0.7)
    assert default_generation_kwargs(model, max_new_tokens=None, num_beams=None) == {
        "max_new_tokens": 3, "do_sample": False, "num_beams": 2, "no_repeat_ngram_size": 0,
    }  # fmt: skip
    assert default_generation_kwargs(model, max_new_tokens=5)["max_new_tokens"] == 5  # the caller wins
    assert default_generation_kwargs(None) == DEFAULT_GENERATION
    assert new_token_budget({}, model) == 3 and new_token_budget({"max_new_tokens": 9}, model) == 9


def test_a_new_model_decodes_greedy_with_the_repetition_guard(build, model_dirs, tmp_path):
    """The decoder's own sampling defaults (chat models ship do_sample=True) do not leak into transcription."""
    decoder = tmp_path / "sampling-decoder"
    shutil.copytree(model_dirs("decoder", "qwen2"), decoder)
    generation = GenerationConfig.from_pretrained(decoder)
    generation.update(do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=2048)
    generation.save_pretrained(decoder)
    _, _, model = create_speech_lm_model(str(model_dirs("encoder", "wav2vec2-layer")), str(decoder),
                                         projector_hidden_size=32)  # fmt: skip
    assert saved_generation_settings(model) == DEFAULT_GENERATION


@pytest.mark.parametrize("trainable_only", [False, True])
def test_transcribe_uses_the_saved_generation_config(build, tmp_path, monkeypatch, trainable_only):
    processor, model = build("wav2vec2-layer", "qwen2", dtype=torch.float32)
    model.generation_config.update(max_new_tokens=3, num_beams=2)
    model.save_pretrained(tmp_path, trainable_only=trainable_only)
    processor.save_pretrained(tmp_path)
    loaded = SpeechLMModel.from_pretrained(tmp_path)
    calls = []
    real = loaded.generate
    monkeypatch.setattr(loaded, "generate", lambda **kwargs: calls.append(kwargs) or real(**kwargs))
    transcribe_arrays(loaded, SpeechLMProcessor.from_pretrained(tmp_path), make_clips((0.5,)))
    transcribe_arrays(loaded, SpeechLMProcessor.from_pretrained(tmp_path), make_clips((0.5,)), max_new_tokens=4)
    assert [(c["max_new_tokens"], c["num_beams"], c["no_repeat_ngram_size"]) for c in calls] == [(3, 2, 10), (4, 2, 10)]

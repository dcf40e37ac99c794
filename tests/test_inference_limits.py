"""Sequence limits: audio + prompt + new tokens are checked against the LLM's positions before any work is done."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from speechlm.cli import main
from speechlm.inference import audio_positions, position_limit, prompt_positions, transcribe_arrays
from tests.conftest import make_clips

SR = 16000


@pytest.fixture(scope="module")
def whisper_gpt2(build):
    """GPT-2 has a learned position table (512 here): past it, generation crashes with an IndexError."""
    return build("whisper", "gpt2")


@pytest.mark.parametrize("encoder", ["whisper", "wav2vec2-layer"])
def test_audio_positions_match_the_merged_sequence(build, encoder):
    processor, model = build(encoder, "qwen2")
    for samples in (1600, 8000, 12345, 16001, 400000):
        batch = processor([np.full(samples, 0.01, dtype=np.float32)])
        merged = model.prepare_inputs(**batch)
        prompt = prompt_positions(processor)
        assert audio_positions(model, processor, samples) + prompt == int(merged.attention_mask.sum()), samples


def test_long_prompt_is_a_clear_value_error(whisper_gpt2):
    processor, model = whisper_gpt2
    assert position_limit(model) == 512
    clip = make_clips((1.0,))[0]
    expected = r"clip 0: audio \(15 positions\) \+ prompt \(\d+ tokens\).*exceeds the LLM's 512"
    with pytest.raises(ValueError, match=expected):
        transcribe_arrays(model, processor, [clip], prompt="x " * 600, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"max_new_tokens \(500\).*exceeds the LLM's 512 positions"):
        transcribe_arrays(model, processor, [clip], max_new_tokens=500)
    # What fits still works, and the check never changes a transcript.
    assert isinstance(transcribe_arrays(model, processor, [clip], max_new_tokens=4)[0], str)


def test_cli_refuses_new_tokens_beyond_the_position_limit_up_front(whisper_gpt2, tmp_path, capsys):
    processor, model = whisper_gpt2
    folder = tmp_path / "gpt2-model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    path = tmp_path / "a.wav"
    sf.write(path, make_clips((0.5,))[0], SR)
    code = main(["transcribe", str(path), "--model", str(folder), "--max-new-tokens", "500", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "a 25 s chunk (--max-chunk-seconds)" in err and "max_new_tokens (500)" in err and "512 positions" in err
    assert "Traceback" not in err
    # Short chunks and a modest budget fit: the same files transcribe.
    assert main(["transcribe", str(path), "--model", str(folder), "--max-new-tokens", "4", "--max-chunk-seconds",
                 "10", "--quiet"]) == 0  # fmt: skip

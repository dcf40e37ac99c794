"""The processor's audio token arithmetic (speechlm/audio_tokens.py): the count each clip's placeholder expands to
must equal what the model's encoder and projector produce, for every encoder family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from speechlm.audio_tokens import audio_token_rule, count_audio_tokens, expand_audio_placeholders
from speechlm.configuration import IGNORE_INDEX
from tests.conftest import make_clips
from tests.tiny_models import ENCODERS


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_rule_counts_what_the_model_produces(build, family):
    _, model = build(family, "llama", layout="placeholder")
    rule = audio_token_rule(model.config.audio_config, model.config.stack_factor)
    # Every length in a range, so each stacking boundary is crossed (an off-by-one frame hides inside a stack).
    lengths = list(range(400, 17000, 7) if model.audio_input_name == "input_values" else range(3, 700))
    expected = model.audio_output_lengths(torch.tensor(lengths)).tolist()
    assert count_audio_tokens(rule, lengths) == expected


def test_rule_follows_the_wav2vec2_adapter_layers():
    config = ENCODERS["wav2vec2-layer"]()
    config.add_adapter, config.adapter_stride, config.num_adapter_layers, config.output_hidden_size = True, 2, 3, 16
    encoder = AutoModel.from_config(config)
    lengths = [400, 4800, 16000]
    expected = encoder._get_feat_extract_output_lengths(torch.tensor(lengths)).tolist()
    assert count_audio_tokens(audio_token_rule(config, 1), lengths) == expected


def test_each_placeholder_becomes_start_tokens_end_with_masked_labels():
    rows, labels = expand_audio_placeholders([[5, 9, 6], [9, 7]], [[-100, -100, 6], [-100, 7]], 9, [2, 1])
    assert rows == [[5, 9, 9, 9, 9, 6], [9, 9, 9, 7]]
    assert labels == [[-100] + [IGNORE_INDEX] * 4 + [6], [IGNORE_INDEX] * 3 + [7]]


@pytest.mark.parametrize("family", ["whisper", "wav2vec2-layer"])
def test_processor_expands_each_clip_to_its_exact_count(build, family):
    processor, model = build(family, "qwen2", layout="placeholder")
    processor = processor.expanding_for(model.config)
    clips = make_clips((0.55, 0.3, 0.8))
    batch = processor(clips)
    audio_id = model.config.audio_token_id
    counts = model.audio_output_lengths(batch["attention_mask"].sum(-1))
    per_row = ((batch["input_ids"] == audio_id) & batch["decoder_attention_mask"].bool()).sum(1)
    assert per_row.tolist() == (counts + 2).tolist()

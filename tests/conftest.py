"""Shared fixtures: tiny real models of every family, saved once per session, loaded the way users load them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechlm import SpeechLMProcessor, create_speech_lm_model
from tests.tiny_models import save_decoder, save_encoder

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Lazily saved checkpoint folders: model_dirs("encoder", "whisper") -> Path."""
    root = tmp_path_factory.mktemp("checkpoints")
    cache = {}

    def get(kind: str, family: str):
        key = (kind, family)
        if key not in cache:
            saver = save_encoder if kind == "encoder" else save_decoder
            cache[key] = saver(family, root / f"{kind}-{family}")
        return cache[key]

    return get


@pytest.fixture(scope="session")
def build(model_dirs):
    """build(encoder_family, decoder_family, **kwargs) -> (processor, model) in float64 eval mode.

    float64 makes batched-vs-single differences numerical noise at 1e-12, so token-level equality is meaningful
    even for random tiny models whose logits are nearly tied.
    """

    def make(encoder: str, decoder: str, dtype=torch.float64, layout: str = "prefix", **kwargs):
        kwargs.setdefault("projection_hidden_size", 32)
        feature_extractor, tokenizer, model = create_speech_lm_model(
            str(model_dirs("encoder", encoder)), str(model_dirs("decoder", decoder)), audio_layout=layout, **kwargs
        )
        torch.manual_seed(0)
        # A non-trivial projector and boundary embeddings so audio actually drives the output.
        for param in [*model.multi_modal_projector.parameters(), model.audio_start, model.audio_end]:
            param.data.normal_(0, 0.5)
        model = model.to(dtype).eval()
        processor = SpeechLMProcessor(feature_extractor, tokenizer, audio_layout=layout, prompt="transcribe")
        return processor, model

    return make


def make_clips(seconds=(0.55, 0.3, 0.8), seed: int = 0, sampling_rate: int = 16000) -> list[np.ndarray]:
    """Deterministic speech-like clips (modulated tones + noise) of different lengths."""
    rng = np.random.default_rng(seed)
    clips = []
    for i, duration in enumerate(seconds):
        t = np.arange(int(duration * sampling_rate)) / sampling_rate
        tone = np.sin(2 * np.pi * (150 + 60 * i) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
        clips.append((0.3 * tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32))
    return clips


@pytest.fixture
def clips():
    return make_clips()

"""`create_speech_lm_model`: pretrained encoder + pretrained LLM -> (feature_extractor, tokenizer, SpeechLMModel).

Loading the base models and assembling lives in `base_models`, the checkpoint files in `checkpoint_files`; their
names stay importable from here.
"""

from __future__ import annotations

import torch

from .base_models import (
    AUDIO_TOKEN,
    BASE_MODELS_ROOT_ENV,
    PAD_TOKEN,
    add_special_tokens,
    assemble,
    load_decoder,
    load_encoder,
    portable_base_model,
    resize_embeddings,
)
from .base_models import build_from_config as _build_from_config
from .checkpoint_files import LORA_ADAPTER_DIR, MODEL_CARD_MARK, TRAINABLE_WEIGHTS_NAME, load_trainable_only
from .configuration import SpeechLMConfig, one_value
from .encoders import exact_feature_extractor
from .modeling import SpeechLMModel


def create_speech_lm_model(
    encoder_name: str,
    decoder_name: str,
    projection_hidden_size: int | None = None,
    encoder_dropout: float | None = None,
    stack_factor: int | None = None,
    audio_layout: str = "prefix",
    projector_act: str = "gelu",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
    encoder_kwargs: dict | None = None,
    decoder_kwargs: dict | None = None,
    projector_dtype: torch.dtype | None = None,
    projector_hidden_size: int | None = None,
    projector_dropout: float | None = None,
    projector_layers: int = 0,
):
    """Join a pretrained audio encoder and a pretrained decoder-only LLM with a fresh projector.

    Both names accept hub ids or local folders; the encoder may also be a CTranslate2 / faster-whisper folder.
    Loading options (dtype, attn_implementation, revision, gguf_file, ...) pass through to `from_pretrained`;
    `encoder_kwargs` / `decoder_kwargs` reach only one side. The projector takes the LLM's dtype unless
    `projector_dtype` says otherwise (float32 master weights beside a bf16 LLM train more stably).
    `projector_hidden_size` / `projector_dropout` are the config's names for the seed's `projection_hidden_size` /
    `encoder_dropout` (one concept, both spellings accepted); `projector_layers` adds transformer layers inside
    the projector (`SpeechLMProjector`).
    Returns `(feature_extractor, tokenizer, model)`; the feature extractor gives every clip of a padded batch
    exactly what it gets alone (`encoders.ExactWhisperFeatureExtractor`), so batched generation == one by one.
    """
    hidden = one_value("projector_hidden_size", projector_hidden_size, "projection_hidden_size",
                        projection_hidden_size, 1024)
    dropout = one_value("projector_dropout", projector_dropout, "encoder_dropout", encoder_dropout, 0.0)
    common = {"dtype": dtype, "attn_implementation": attn_implementation, "revision": revision}
    common = {k: v for k, v in common.items() if v is not None}
    encoder_loading = {**common, **(encoder_kwargs or {})}
    decoder_loading = {**common, **({"gguf_file": gguf_file} if gguf_file else {}), **(decoder_kwargs or {})}

    feature_extractor, audio_tower, _ = load_encoder(encoder_name, **encoder_loading)
    feature_extractor = exact_feature_extractor(feature_extractor)
    tokenizer, language_model = load_decoder(decoder_name, **decoder_loading)
    audio_token_id = add_special_tokens(tokenizer, language_model)
    config = SpeechLMConfig(
        audio_config=audio_tower.config,
        text_config=language_model.config,
        projector_hidden_size=hidden,
        projector_dropout=dropout,
        projector_act=projector_act,
        projector_layers=projector_layers,
        stack_factor=stack_factor,
        audio_layout=audio_layout,
        audio_token_id=audio_token_id,
        encoder_name_or_path=str(encoder_name),
        decoder_name_or_path=str(decoder_name),
        encoder_loading_kwargs=_serialisable(encoder_loading),
        decoder_loading_kwargs=_serialisable(decoder_loading),
    )
    model = assemble(SpeechLMModel, config, audio_tower, language_model, projector_dtype)
    return feature_extractor, tokenizer, model


def build_from_config(config: SpeechLMConfig, dtype: torch.dtype | str | None = None, encoder: str | None = None,
                      decoder: str | None = None, checkpoint: str | None = None,
                      hub_kwargs: dict | None = None) -> SpeechLMModel:
    """A SpeechLMModel rebuilt on the base models `config` records (see `base_models.build_from_config`)."""
    return _build_from_config(SpeechLMModel, config, dtype, encoder, decoder, checkpoint, hub_kwargs)


def _serialisable(kwargs: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        if isinstance(value, str | int | float | bool) or value is None:
            out[key] = value
    return out


__all__ = ["create_speech_lm_model", "build_from_config", "load_encoder", "load_decoder", "AUDIO_TOKEN", "PAD_TOKEN",
           "portable_base_model", "BASE_MODELS_ROOT_ENV", "LORA_ADAPTER_DIR", "MODEL_CARD_MARK",
           "TRAINABLE_WEIGHTS_NAME", "add_special_tokens", "load_trainable_only", "resize_embeddings"]

"""`create_speech_lm_model`: pretrained encoder + pretrained LLM -> (feature_extractor, tokenizer, SpeechLMModel)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .configuration import SpeechLMConfig
from .encoders import encoder_adapter
from .modeling import SpeechLMModel

AUDIO_TOKEN = "<|audio|>"
PAD_TOKEN = "<|pad|>"
_SHARED_LOADING_KEYS = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code")


def load_encoder(name_or_path: str, **loading_kwargs):
    """(feature_extractor, encoder module, adapter) for a hub id, a local folder or a CTranslate2 Whisper folder."""
    from .converters.ctranslate2 import ctranslate2_feature_extractor, is_ctranslate2_whisper

    if is_ctranslate2_whisper(name_or_path):
        config = AutoConfig.for_model("whisper")  # the adapter's loader reads the real config from model.bin
        encoder = encoder_adapter(config).load(name_or_path, **loading_kwargs)
        feature_extractor = ctranslate2_feature_extractor(Path(name_or_path), encoder.config.num_mel_bins)
        return feature_extractor, encoder, encoder_adapter(encoder.config)
    shared = {k: v for k, v in loading_kwargs.items() if k in _SHARED_LOADING_KEYS}
    config = AutoConfig.from_pretrained(name_or_path, **shared)
    adapter = encoder_adapter(config)
    encoder = adapter.load(name_or_path, **loading_kwargs)
    feature_extractor = AutoFeatureExtractor.from_pretrained(name_or_path, **shared)
    return feature_extractor, encoder, adapter


def load_decoder(name_or_path: str, with_tokenizer: bool = True, **loading_kwargs):
    """(tokenizer, causal LM) for a hub id, a local folder or a GGUF file (`gguf_file=`).

    A local GGUF file is de-quantised once into the conversion cache and read from there afterwards. The tokenizer
    is None with `with_tokenizer=False` (a trainable-only checkpoint carries its own).
    """
    from .converters.gguf import cached_gguf_folder

    cached = cached_gguf_folder(name_or_path, loading_kwargs)
    if cached is not None:
        name_or_path, loading_kwargs = str(cached[0]), cached[1]
    tokenizer = None
    if with_tokenizer:
        tokenizer_kwargs = {k: v for k, v in loading_kwargs.items() if k in (*_SHARED_LOADING_KEYS, "gguf_file")}
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **tokenizer_kwargs)
    language_model = AutoModelForCausalLM.from_pretrained(name_or_path, **loading_kwargs)
    if language_model.config.is_encoder_decoder:
        raise ValueError(f"{name_or_path} is an encoder-decoder model; SpeechLM needs a decoder-only LLM")
    return tokenizer, language_model


def resize_embeddings(language_model, size: int) -> None:
    """Grow the vocabulary with rows equal to the mean of the old ones, not random ones.

    A trainable-only checkpoint does not store the frozen embeddings, so random new rows (the `<|audio|>` and pad
    tokens) came back different on every load: with tied embeddings their logits changed between two loads.
    """
    old = language_model.get_input_embeddings().weight.shape[0]
    language_model.resize_token_embeddings(size, mean_resizing=False)
    if size <= old:
        return
    with torch.no_grad():
        for layer in {id(m): m for m in (language_model.get_input_embeddings(),
                                         language_model.get_output_embeddings()) if m is not None}.values():
            weight = layer.weight
            weight[old:] = weight[:old].float().mean(0).to(weight.dtype)
            bias = getattr(layer, "bias", None)
            if bias is not None and bias.shape[0] == size:
                bias[old:] = bias[:old].float().mean().to(bias.dtype)


def add_special_tokens(tokenizer, language_model) -> int:
    """Add `<|audio|>` (and a pad token if missing); resize the embeddings only when the vocab grew past them."""
    tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if len(tokenizer) > language_model.get_input_embeddings().weight.shape[0]:
        resize_embeddings(language_model, len(tokenizer))
    language_model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)


def create_speech_lm_model(
    encoder_name: str,
    decoder_name: str,
    projection_hidden_size: int = 1024,
    encoder_dropout: float = 0.0,
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
):
    """Join a pretrained audio encoder and a pretrained decoder-only LLM with a fresh projector.

    Both names accept hub ids or local folders; the encoder may also be a CTranslate2 / faster-whisper folder.
    Loading options (dtype, attn_implementation, revision, gguf_file, ...) pass through to `from_pretrained`;
    `encoder_kwargs` / `decoder_kwargs` reach only one side. The projector takes the LLM's dtype unless
    `projector_dtype` says otherwise (float32 master weights beside a bf16 LLM train more stably).
    Returns `(feature_extractor, tokenizer, model)`.
    """
    common = {"dtype": dtype, "attn_implementation": attn_implementation, "revision": revision}
    common = {k: v for k, v in common.items() if v is not None}
    encoder_loading = {**common, **(encoder_kwargs or {})}
    decoder_loading = {**common, **({"gguf_file": gguf_file} if gguf_file else {}), **(decoder_kwargs or {})}

    feature_extractor, audio_tower, _ = load_encoder(encoder_name, **encoder_loading)
    tokenizer, language_model = load_decoder(decoder_name, **decoder_loading)
    audio_token_id = add_special_tokens(tokenizer, language_model)
    config = SpeechLMConfig(
        audio_config=audio_tower.config,
        text_config=language_model.config,
        projector_hidden_size=projection_hidden_size,
        projector_dropout=encoder_dropout,
        projector_act=projector_act,
        stack_factor=stack_factor,
        audio_layout=audio_layout,
        audio_token_id=audio_token_id,
        encoder_name_or_path=str(encoder_name),
        decoder_name_or_path=str(decoder_name),
        encoder_loading_kwargs=_serialisable(encoder_loading),
        decoder_loading_kwargs=_serialisable(decoder_loading),
    )
    model = _assemble(config, audio_tower, language_model, projector_dtype)
    return feature_extractor, tokenizer, model


def build_from_config(config: SpeechLMConfig, dtype: torch.dtype | str | None = None) -> SpeechLMModel:
    """Rebuild a SpeechLMModel on its base models (for trainable-only checkpoints); weights of our parts are fresh."""
    encoder_loading = dict(config.encoder_loading_kwargs or {})
    decoder_loading = dict(config.decoder_loading_kwargs or {})
    if dtype is not None:
        encoder_loading["dtype"] = decoder_loading["dtype"] = dtype
    _, audio_tower, _ = load_encoder(config.encoder_name_or_path, **encoder_loading)
    _, language_model = load_decoder(config.decoder_name_or_path, with_tokenizer=False, **decoder_loading)
    vocab = config.text_config.vocab_size
    if language_model.get_input_embeddings().weight.shape[0] != vocab:
        resize_embeddings(language_model, vocab)
    language_model.config.pad_token_id = config.text_config.pad_token_id
    return _assemble(config, audio_tower, language_model)


def _assemble(config: SpeechLMConfig, audio_tower, language_model, projector_dtype=None) -> SpeechLMModel:
    model = SpeechLMModel(config, audio_tower=audio_tower, language_model=language_model)
    dtype = projector_dtype or language_model.get_input_embeddings().weight.dtype
    model.multi_modal_projector.to(dtype)
    model.audio_start.data = model.audio_start.data.to(dtype)
    model.audio_end.data = model.audio_end.data.to(dtype)
    if model.ctc_head is not None:
        model.ctc_head.to(dtype)
    generation_config = getattr(language_model, "generation_config", None) or GenerationConfig()
    generation_config = GenerationConfig.from_dict(generation_config.to_dict())
    generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config = generation_config
    model.config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


def _serialisable(kwargs: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        if isinstance(value, str | int | float | bool) or value is None:
            out[key] = value
    return out


__all__ = ["create_speech_lm_model", "build_from_config", "load_encoder", "load_decoder", "AUDIO_TOKEN"]

"""The base models under a SpeechLM model: loading the pretrained encoder and decoder, recording where they came from
in a portable way, and assembling a model class around them.

The model class is an argument (`assemble(SpeechLMModel, ...)`), so this module imports no model code: `modeling`
(loading trainable-only checkpoints) and `factory` (`create_speech_lm_model`) both build on it without an import
cycle between them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .configuration import DEFAULT_GENERATION, SpeechLMConfig
from .encoders import encoder_adapter

AUDIO_TOKEN = "<|audio|>"
PAD_TOKEN = "<|pad|>"
_SHARED_LOADING_KEYS = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code")


def without_hub_kernels(loading_kwargs: dict) -> dict:
    """`from_pretrained` keywords with transformers' hub kernels off unless asked for (`use_kernels=True`).

    transformers (5.25) turns them on by default wherever the `kernels` package is installed (it now depends on it),
    and on a GPU the next `train()` fetches kernel code from the hub: offline that raises, online it swaps layers for
    downloaded code. SpeechLM works offline and the same on every machine, so they stay off by default."""
    return {"use_kernels": False, **loading_kwargs}


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
    encoder = adapter.load(name_or_path, **without_hub_kernels(loading_kwargs))
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
    file_kwargs = {k: v for k, v in loading_kwargs.items() if k in (*_SHARED_LOADING_KEYS, "gguf_file")}
    # Asked of the folder's config: transformers loads Whisper or BART folders as *ForCausalLM (their text
    # decoder, is_encoder_decoder=False), which would silently drop the encoder the user meant to pass elsewhere.
    if getattr(AutoConfig.from_pretrained(name_or_path, **file_kwargs), "is_encoder_decoder", False):
        raise ValueError(f"{name_or_path} is an encoder-decoder model; SpeechLM needs a decoder-only LLM as the "
                         "decoder (an audio encoder such as Whisper's goes in encoder_name)")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **file_kwargs) if with_tokenizer else None
    language_model = AutoModelForCausalLM.from_pretrained(name_or_path, **without_hub_kernels(loading_kwargs))
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


def build_from_config(model_class: type, config: SpeechLMConfig, dtype: torch.dtype | str | None = None,
                      encoder: str | None = None, decoder: str | None = None, checkpoint: str | None = None,
                      hub_kwargs: dict | None = None):
    """Rebuild a `model_class` (SpeechLMModel) on its base models (for trainable-only checkpoints); weights of our
    parts are fresh.

    `encoder` / `decoder` (hub id or folder) replace the recorded base models, e.g. a local copy on another machine;
    a replaced base model is loaded without the recorded revision. A base model that cannot be loaded raises an
    `OSError` naming it and these two options. `hub_kwargs` (cache_dir, local_files_only, token) reach both loads.
    """
    _, audio_tower, _ = _load_base(config, "encoder", encoder, dtype, checkpoint, hub_kwargs)
    _, language_model = _load_base(config, "decoder", decoder, dtype, checkpoint, hub_kwargs)
    vocab = config.text_config.vocab_size
    if language_model.get_input_embeddings().weight.shape[0] != vocab:
        resize_embeddings(language_model, vocab)
    language_model.config.pad_token_id = config.text_config.pad_token_id
    return assemble(model_class, config, audio_tower, language_model, new=False)


def _load_base(config: SpeechLMConfig, side: str, override: str | None, dtype, checkpoint: str | None,
               hub_kwargs: dict | None = None):
    recorded = getattr(config, f"{side}_name_or_path")
    loading = {**(getattr(config, f"{side}_loading_kwargs") or {}), **(hub_kwargs or {})}
    if override is not None:
        loading.pop("revision", None)
    if dtype is not None:
        loading["dtype"] = dtype
    name = str(override) if override is not None else resolve_base_model(recorded)
    if not name:
        raise ValueError(f"{checkpoint or 'this config'} records no {side} base model: pass {side}=<hub id or folder>")
    loader = load_encoder if side == "encoder" else load_decoder
    extra = {} if side == "encoder" else {"with_tokenizer": False}
    if side == "decoder" and loading.get("local_files_only"):
        # transformers' PEFT-adapter probe ignores local_files_only (it retried the hub for ~25 s offline).
        extra["adapter_kwargs"] = {k: loading[k] for k in ("local_files_only", "cache_dir") if k in loading}
    try:
        return loader(name, **extra, **loading)
    except OSError as error:
        revision = f" at revision {loading['revision']}" if loading.get("revision") else ""
        raise OSError(
            f"The trainable-only checkpoint {checkpoint or ''} is built on the {side} {name!r}{revision}, which could "
            f"not be loaded ({error}). Pass {side}=<hub id or local folder> to from_pretrained (AutoModel too) to use "
            f"another copy of it, or set {BASE_MODELS_ROOT_ENV} to the folder that holds relative base model paths."
        ) from error


BASE_MODELS_ROOT_ENV = "SPEECHLM_BASE_MODELS"


def portable_base_model(name_or_path: str, loading_kwargs: dict) -> tuple[str, dict]:
    """(name, loading kwargs) to record for a base model so the checkpoint loads on another machine.

    A folder inside a Hugging Face cache (`.../models--org--name/snapshots/<commit>`) becomes its hub id with that
    commit as `revision`; a folder under `$SPEECHLM_BASE_MODELS` is recorded relative to it; hub ids stay as given.
    Other local paths are kept (and need `encoder=` / `decoder=` at load on another machine).
    """
    path = Path(name_or_path)
    if not path.exists():
        return str(name_or_path), loading_kwargs
    resolved = path.resolve()
    parts = resolved.parts
    for index in range(len(parts) - 2):
        if parts[index].startswith("models--") and parts[index + 1] == "snapshots":
            repo_id = parts[index].removeprefix("models--").replace("--", "/", 1)
            loading = {**loading_kwargs, "revision": parts[index + 2]}
            return repo_id, loading
    root = os.environ.get(BASE_MODELS_ROOT_ENV)
    if root and resolved.is_relative_to(Path(root).resolve()):
        return resolved.relative_to(Path(root).resolve()).as_posix(), loading_kwargs
    return str(name_or_path), loading_kwargs


def make_portable(config: SpeechLMConfig) -> dict:
    """Record `portable_base_model` names in `config` (sub-configs' `_name_or_path` too); returns the old values."""
    old = {}
    for side, sub in (("encoder", "audio_config"), ("decoder", "text_config")):
        name = getattr(config, f"{side}_name_or_path")
        loading = getattr(config, f"{side}_loading_kwargs") or {}
        old[side] = (name, loading, getattr(config, sub)._name_or_path)
        if name:
            name, loading = portable_base_model(name, loading)
            setattr(config, f"{side}_name_or_path", name)
            setattr(config, f"{side}_loading_kwargs", loading)
            getattr(config, sub)._name_or_path = name
    return old


def restore_names(config: SpeechLMConfig, old: dict) -> None:
    for side, sub in (("encoder", "audio_config"), ("decoder", "text_config")):
        name, loading, sub_name = old[side]
        setattr(config, f"{side}_name_or_path", name)
        setattr(config, f"{side}_loading_kwargs", loading)
        getattr(config, sub)._name_or_path = sub_name


def resolve_base_model(name: str | None) -> str | None:
    """A recorded base model name -> what to load: a relative path found under `$SPEECHLM_BASE_MODELS` wins."""
    root = os.environ.get(BASE_MODELS_ROOT_ENV)
    if name and root and not os.path.isabs(name) and (Path(root) / name).exists():
        return str(Path(root) / name)
    return name


def assemble(model_class: type, config: SpeechLMConfig, audio_tower, language_model, projector_dtype=None,
             new: bool = True):
    """`model_class(config, audio_tower, language_model)` with our parts in the LLM's dtype (or `projector_dtype`) and
    a generation config: the decoder's, with `DEFAULT_GENERATION` on top for a `new` model (a rebuilt checkpoint
    reads its own generation_config.json afterwards)."""
    model = model_class(config, audio_tower=audio_tower, language_model=language_model)
    dtype = projector_dtype or language_model.get_input_embeddings().weight.dtype
    model.multi_modal_projector.to(dtype)
    model.audio_start.data = model.audio_start.data.to(dtype)
    model.audio_end.data = model.audio_end.data.to(dtype)
    if model.ctc_head is not None:
        model.ctc_head.to(dtype)
    generation_config = getattr(language_model, "generation_config", None) or GenerationConfig()
    generation_config = GenerationConfig.from_dict(generation_config.to_dict())
    generation_config.pad_token_id = config.text_config.pad_token_id
    if new:
        for name in ("temperature", "top_p", "top_k"):
            setattr(generation_config, name, None)
        generation_config.update(**DEFAULT_GENERATION)
    model.generation_config = generation_config
    model.config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


__all__ = ["AUDIO_TOKEN", "BASE_MODELS_ROOT_ENV", "PAD_TOKEN", "add_special_tokens", "assemble", "build_from_config",
           "load_decoder", "load_encoder", "make_portable", "portable_base_model", "resize_embeddings",
           "resolve_base_model", "restore_names"]

"""`create_speech_lm_model`: pretrained encoder + pretrained LLM -> (feature_extractor, tokenizer, SpeechLMModel)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .configuration import SpeechLMConfig
from .encoders import encoder_adapter, exact_feature_extractor
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
):
    """Join a pretrained audio encoder and a pretrained decoder-only LLM with a fresh projector.

    Both names accept hub ids or local folders; the encoder may also be a CTranslate2 / faster-whisper folder.
    Loading options (dtype, attn_implementation, revision, gguf_file, ...) pass through to `from_pretrained`;
    `encoder_kwargs` / `decoder_kwargs` reach only one side. The projector takes the LLM's dtype unless
    `projector_dtype` says otherwise (float32 master weights beside a bf16 LLM train more stably).
    `projector_hidden_size` / `projector_dropout` are the config's names for the seed's `projection_hidden_size` /
    `encoder_dropout` (one concept, both spellings accepted).
    Returns `(feature_extractor, tokenizer, model)`; the feature extractor gives every clip of a padded batch
    exactly what it gets alone (`encoders.ExactWhisperFeatureExtractor`), so batched generation == one by one.
    """
    hidden = _one_value("projector_hidden_size", projector_hidden_size, "projection_hidden_size",
                        projection_hidden_size, 1024)
    dropout = _one_value("projector_dropout", projector_dropout, "encoder_dropout", encoder_dropout, 0.0)
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


def _one_value(name: str, value, old_name: str, old_value, default):
    if value is not None and old_value is not None and value != old_value:
        raise ValueError(f"{name}={value!r} and {old_name}={old_value!r} name the same setting: pass one")
    return value if value is not None else old_value if old_value is not None else default


def build_from_config(config: SpeechLMConfig, dtype: torch.dtype | str | None = None, encoder: str | None = None,
                      decoder: str | None = None, checkpoint: str | None = None,
                      hub_kwargs: dict | None = None) -> SpeechLMModel:
    """Rebuild a SpeechLMModel on its base models (for trainable-only checkpoints); weights of our parts are fresh.

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
    return _assemble(config, audio_tower, language_model)


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


__all__ = ["create_speech_lm_model", "build_from_config", "load_encoder", "load_decoder", "AUDIO_TOKEN",
           "portable_base_model", "BASE_MODELS_ROOT_ENV"]


# ---------------------------------------------------------------------------------------------- checkpoint files
TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"
LORA_ADAPTER_DIR = "language_model_adapter"  # peft's own format, for PeftModel.from_pretrained(model.language_model)
MODEL_CARD_MARK = "<!-- written by speechlm: save_pretrained rewrites this card; remove this line to keep edits -->"
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def save_trainable_only(model: SpeechLMModel, save_directory: str) -> None:
    """Projector, audio start/end, CTC head and whatever else trains (LoRA goes to `LORA_ADAPTER_DIR`), plus a
    config recording portable base model ids (`portable_base_model`)."""
    from safetensors.torch import save_file

    config = model.config.__class__.from_dict(model.config.to_dict())
    for side in ("encoder", "decoder"):
        if not getattr(config, f"{side}_name_or_path"):
            raise ValueError(f"trainable_only needs config.{side}_name_or_path (the base model to rebuild on)")
    make_portable(config)
    os.makedirs(save_directory, exist_ok=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.multi_modal_projector.named_parameters(prefix="multi_modal_projector")}
    names |= {"audio_start", "audio_end"}
    names |= {n for n, _ in model.named_parameters() if n.startswith("ctc_head.")}
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if n in names and "lora_" not in n}
    save_file(state, os.path.join(save_directory, TRAINABLE_WEIGHTS_NAME), metadata={"format": "pt"})
    config.trainable_only = True
    config.save_pretrained(save_directory)
    model.generation_config.save_pretrained(save_directory)


def load_trainable_only(path: str, config: SpeechLMConfig | None = None, dtype=None, encoder: str | None = None,
                        decoder: str | None = None, **hub_kwargs) -> SpeechLMModel | None:
    """A trainable-only folder or hub repo rebuilt on its base models; None when `path` is not one.

    `cache_dir` / `local_files_only` / `token` / `force_download` also reach the base models' loading.
    """
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS and v is not None}
    found = cached_file(path, TRAINABLE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False, **hub_kwargs)
    if found is None:
        return None
    if config is None:
        config = SpeechLMConfig.from_pretrained(path, **hub_kwargs)
    shared = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "force_download", "local_files_only", "token")}
    model = build_from_config(config, dtype=dtype, encoder=encoder, decoder=decoder, checkpoint=str(path),
                              hub_kwargs=shared)
    state = load_file(found)
    adapter = cached_file(path, f"{LORA_ADAPTER_DIR}/adapter_model.safetensors",
                          _raise_exceptions_for_missing_entries=False,
                          _raise_exceptions_for_connection_errors=False, **hub_kwargs)
    if adapter is not None:
        state.update({f"language_model.{k}": v for k, v in lora_state_from_peft(load_file(adapter)).items()})
    parameters = dict(model.named_parameters())
    unknown = set(state) - set(parameters)
    if unknown:
        raise ValueError(f"{found} holds weights the rebuilt model lacks: {sorted(unknown)[:5]}")
    model.load_state_dict(state, strict=False)
    model.config.trainable_only = False
    return model.eval()


def _lora_parameters(model: SpeechLMModel) -> dict:
    return {n: p for n, p in model.language_model.named_parameters() if "lora_" in n}


def lora_state_to_peft(state: dict) -> dict:
    """Injected names (`...q_proj.lora_A.default.weight`) -> peft's saved ones (`base_model.model....lora_A.weight`)."""
    return {"base_model.model." + re.sub(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)", r".\1", k): v
            for k, v in state.items()}


def lora_state_from_peft(state: dict) -> dict:
    return {re.sub(r"\.(lora_[A-Za-z_]+)(?=\.|$)", r".\1.default", k.removeprefix("base_model.model.")): v
            for k, v in state.items()}


def save_lora_adapter(model: SpeechLMModel, save_directory: str) -> None:
    """The decoder's LoRA adapters in peft's format: `PeftModel.from_pretrained(language_model, folder)` reads them."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save_file

    targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.language_model.named_modules()
                      if isinstance(module, BaseTunerLayer)})
    decoder, _ = portable_base_model(model.config.decoder_name_or_path or "", {})
    settings = {**model.config.lora, "target_modules": targets}
    config = LoraConfig(**settings, task_type="CAUSAL_LM", base_model_name_or_path=decoder or None)
    folder = os.path.join(save_directory, LORA_ADAPTER_DIR)
    config.save_pretrained(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in _lora_parameters(model).items()}
    save_file(lora_state_to_peft(state), os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def write_model_card(model: SpeechLMModel, save_directory: str, metrics: dict | None = None,
                     pipeline_tag: str | None = None, trainable_only: bool = False) -> None:
    """README.md with hub metadata (base models, pipeline_tag, library, metrics); a card without our mark is kept."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(save_directory, "README.md")
    if os.path.isfile(path) and MODEL_CARD_MARK not in Path(path).read_text(encoding="utf-8"):
        return
    config = model.config
    bases = [portable_base_model(getattr(config, f"{side}_name_or_path") or "", {})[0]
             for side in ("encoder", "decoder")]
    hub_ids = [b for b in bases if b and not os.path.isabs(b) and not b.startswith(".")]
    data = ModelCardData(
        library_name="transformers", pipeline_tag=pipeline_tag or "automatic-speech-recognition",
        base_model=hub_ids or None, tags=["speechlm", "audio", "speech", "custom_code"],
        metrics=sorted(metrics) if metrics else None,
    )
    kind = ("Trainable-only checkpoint: the projector (and LoRA adapters) only; loading fetches the base models "
            "above (override with `encoder=` / `decoder=`)." if trainable_only else "Full checkpoint.")
    lines = [MODEL_CARD_MARK, "", f"# SpeechLM: {bases[0]} + {bases[1]}", "",
             "Audio encoder -> projector -> decoder-only LLM, built with SpeechLM "
             f"(audio layout `{config.audio_layout}`). {kind}", "", "## Usage", "", "```python",
             "import speechlm  # registers SpeechLM with transformers' Auto classes",
             "from transformers import AutoModel, AutoProcessor", "",
             'model = AutoModel.from_pretrained("<this repo or folder>")',
             'processor = AutoProcessor.from_pretrained("<this repo or folder>")',
             "inputs = processor(audio_arrays)  # list of 1-D float arrays at the encoder's sampling rate",
             "print(processor.batch_decode(model.generate(**inputs, max_new_tokens=64)))", "```"]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in metrics.items()]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    card.save(path)


def save_checkpoint_extras(model: SpeechLMModel, save_directory: str, trainable_only: bool = False,
                           metrics: dict | None = None, pipeline_tag: str | None = None) -> None:
    """What every saved folder gets beside the weights: peft adapters, the `auto_map` module and the model card."""
    from .configuration import write_remote_code

    if model.config.lora and _lora_parameters(model):
        save_lora_adapter(model, save_directory)
    write_remote_code(save_directory)
    write_model_card(model, save_directory, metrics, pipeline_tag, trainable_only)

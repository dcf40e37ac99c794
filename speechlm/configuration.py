"""SpeechLM configuration: the encoder's config + the decoder's config + the few settings that join them."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig

AUDIO_LAYOUTS = ("prefix", "placeholder")
IGNORE_INDEX = -100  # the label the loss skips (audio, prompt and padding positions)
# `auto_map` points at a two-line module saved beside the weights that imports the installed speechlm classes
# (`REMOTE_CODE_MODULE`): `trust_remote_code=True` then works without `import speechlm`, and a machine without
# speechlm gets transformers' "requires the following packages ... speechlm" instead of "update transformers".
REMOTE_CODE_MODULE = "modeling_speechlm"
# The decoding settings a new model's generation config gets (the decoder's own sampling defaults are meant for chat,
# not transcription): greedy, a length cap, and a repetition guard, no 10-token sequence twice in one segment, so a
# segment that starts looping is cut short instead of repeating itself up to the cap; ordinary speech rarely repeats
# 10 tokens verbatim. The guard works per row, so batched output still equals one by one. Decoding (transcribe,
# evaluate, serve) falls back to these where a model's generation_config.json does not set them.
DEFAULT_GENERATION = {"max_new_tokens": 128, "do_sample": False, "num_beams": 1, "no_repeat_ngram_size": 10}
AUTO_MAP = {
    "AutoConfig": f"{REMOTE_CODE_MODULE}.SpeechLMConfig",
    "AutoModel": f"{REMOTE_CODE_MODULE}.SpeechLMModel",
    "AutoProcessor": f"{REMOTE_CODE_MODULE}.SpeechLMProcessor",
}
REMOTE_CODE = (
    '"""Loads SpeechLM from the installed `speechlm` package (pip install speechlm): no model code lives here."""\n\n'
    "from speechlm import SpeechLMConfig, SpeechLMModel, SpeechLMProcessor\n\n"
    '__all__ = ["SpeechLMConfig", "SpeechLMModel", "SpeechLMProcessor"]\n'
)


class SpeechLMConfig(PreTrainedConfig):
    r"""
    Composition of two registered configs, so any encoder/decoder pair known to `AutoConfig` works.

    Args:
        audio_config (`dict` or `PreTrainedConfig`): the audio encoder's config (Wav2Vec2, HuBERT, WavLM,
            Data2VecAudio, Whisper, ...). A Whisper config means "its encoder only".
        text_config (`dict` or `PreTrainedConfig`): the decoder-only LLM's config. Named `text_config` because
            transformers' generation utilities look for the text side under that name.
        projector_hidden_size (`int`): hidden width of the projector MLP.
        projector_layers (`int`): transformer layers inside the projector, reading each clip as a whole (0: the
            MLP alone, token by token).
        projector_dropout (`float`): dropout on the encoder output before the projector (the seed's
            `encoder_dropout`), and inside the projector's layers if it has any.
        stack_factor (`int`, *optional*): consecutive encoder frames concatenated into one LLM token. `None` picks
            the smallest factor giving <= 12.5 audio tokens per second for the encoder's frame rate; 1 disables it.
        audio_layout (`str`): `"prefix"` puts `[audio_start | audio | audio_end | text]`; `"placeholder"` replaces
            every `audio_token_id` in the text by `[audio_start | audio | audio_end]` (several clips per sample).
        audio_token_id (`int`): the dedicated `<|audio|>` token (never EOS: peers that reused EOS confused
            generation).
        encoder_name_or_path / decoder_name_or_path (`str`): where the base models came from, so a trainable-only
            checkpoint can be rebuilt on top of them.
        lora (`dict`, *optional*): LoRA settings applied to the decoder (so loading re-creates the adapters).
        ctc_head (`dict`, *optional*): a CTC head over the projector's output (`speechlm.alignment`):
            `vocabulary_ids` (its classes; `None`: the whole vocabulary), `ignore_token_ids` (never targets) and
            `compress` (shorten the audio the LLM reads to one token per recognised label) and `joint_weight` (the
            joint CTC/LLM decoding weight `speechlm transcribe`, `evaluate` and `serve` use for transcripts when not
            told; 0 or absent: the LLM alone).
    """

    model_type = "speechlm"
    sub_configs = {"audio_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        audio_config: dict | PreTrainedConfig | None = None,
        text_config: dict | PreTrainedConfig | None = None,
        projector_hidden_size: int = 1024,
        projector_dropout: float = 0.0,
        projector_act: str = "gelu",
        projector_layers: int = 0,
        stack_factor: int | None = None,
        audio_layout: str = "prefix",
        audio_token_id: int | None = None,
        encoder_name_or_path: str | None = None,
        decoder_name_or_path: str | None = None,
        encoder_loading_kwargs: dict | None = None,
        decoder_loading_kwargs: dict | None = None,
        lora: dict | None = None,
        ctc_head: dict | None = None,
        trainable_only: bool = False,
        **kwargs,
    ):
        audio_config = _as_config(audio_config, "audio_config")
        text_config = _as_config(text_config, "text_config")
        if audio_layout not in AUDIO_LAYOUTS:
            raise ValueError(f"audio_layout must be one of {AUDIO_LAYOUTS}, got {audio_layout!r}")
        if stack_factor is not None and stack_factor < 1:
            raise ValueError(f"stack_factor must be >= 1 (1 disables stacking), got {stack_factor}")
        self.projector_hidden_size = projector_hidden_size
        self.projector_dropout = projector_dropout
        self.projector_act = projector_act
        if projector_layers < 0:
            raise ValueError(f"projector_layers must be >= 0, got {projector_layers}")
        self.projector_layers = projector_layers
        self.stack_factor = stack_factor
        self.audio_layout = audio_layout
        self.audio_token_id = audio_token_id
        self.encoder_name_or_path = encoder_name_or_path
        self.decoder_name_or_path = decoder_name_or_path
        self.encoder_loading_kwargs = encoder_loading_kwargs or {}
        self.decoder_loading_kwargs = decoder_loading_kwargs or {}
        self.lora = lora
        self.ctc_head = ctc_head
        self.trainable_only = trainable_only
        kwargs["architectures"] = kwargs.get("architectures") or ["SpeechLMModel"]
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        if text_config is not None:
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                kwargs.setdefault(name, getattr(text_config, name, None))
            kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        # Assigned after the base init, whose attn_implementation=None would otherwise overwrite the sub-models'.
        self.audio_config = audio_config
        self.text_config = text_config

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size


# Registered where it is defined, so that whatever imports the class can load saved folders through AutoConfig.
AutoConfig.register(SpeechLMConfig.model_type, SpeechLMConfig, exist_ok=True)


def _as_config(value: dict | PreTrainedConfig | None, name: str) -> PreTrainedConfig | None:
    if value is None or isinstance(value, PreTrainedConfig):
        return value
    if isinstance(value, dict):
        if "model_type" not in value:
            raise ValueError(f"{name} needs a 'model_type' to be resolved through AutoConfig, got keys {sorted(value)}")
        value = dict(value)
        return AutoConfig.for_model(value.pop("model_type"), **value)
    raise TypeError(f"{name} must be a dict or a PreTrainedConfig, got {type(value).__name__}")


def one_value(name: str, value, old_name: str, old_value, default):
    """One setting passed under its two accepted spellings: at most one value (or the same twice), else `default`."""
    if value is not None and old_value is not None and value != old_value:
        raise ValueError(f"{name}={value!r} and {old_name}={old_value!r} name the same setting: pass one")
    return value if value is not None else old_value if old_value is not None else default


def write_remote_code(save_directory: str) -> None:
    """Write the module `auto_map` names (see `REMOTE_CODE_MODULE`)."""
    import os

    with open(os.path.join(save_directory, f"{REMOTE_CODE_MODULE}.py"), "w", encoding="utf-8") as handle:
        handle.write(REMOTE_CODE)


__all__ = ["SpeechLMConfig", "AUTO_MAP", "DEFAULT_GENERATION", "one_value", "write_remote_code"]

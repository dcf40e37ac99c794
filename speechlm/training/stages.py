"""The model a run trains and what each stage lets train: building it from the config, freezing, LoRA, counting."""

from __future__ import annotations

import os

from .config import StageConfig, TrainConfig


def build_model_and_processor(config: TrainConfig, init_from: str | os.PathLike | None = None):
    """(processor, model): fresh from the encoder/decoder pair, or loaded from a SpeechLM folder (a previous stage)."""
    from ..factory import create_speech_lm_model
    from ..modeling import SpeechLMModel
    from ..processing import DEFAULT_PROMPT, SpeechLMProcessor

    source = init_from or config.model.init_from
    dtype = config.model.dtype
    if source is not None:
        model = SpeechLMModel.from_pretrained(source, **({"dtype": dtype} if dtype else {}))
        processor = SpeechLMProcessor.from_pretrained(source)
        if config.data.prompt is not None:
            processor.prompt = config.data.prompt
        return processor, model
    m = config.model
    feature_extractor, tokenizer, model = create_speech_lm_model(
        m.encoder, m.decoder, projection_hidden_size=m.projector_hidden_size, encoder_dropout=m.projector_dropout,
        projector_layers=m.projector_layers, stack_factor=m.stack_factor, audio_layout=m.audio_layout, dtype=dtype,
        attn_implementation=m.attn_implementation, gguf_file=m.gguf_file,
    )  # fmt: skip
    prompt = config.data.prompt if config.data.prompt is not None else DEFAULT_PROMPT
    processor = SpeechLMProcessor(feature_extractor, tokenizer, audio_layout=m.audio_layout, prompt=prompt,
                                  use_chat_template=config.data.use_chat_template)
    return processor, model


def apply_stage(model, stage: StageConfig) -> None:
    """Freeze/unfreeze for `stage` (adding its LoRA adapters first if the decoder has none yet)."""
    if stage.lora and not model.config.lora:  # config.lora is set whenever the decoder carries adapters
        # Only the keys the stage sets: the defaults stay those of `add_lora`, not a second copy here.
        model.add_lora(**stage.lora)
    model.freeze_encoder(not stage.train_encoder)
    model.freeze_decoder(not stage.train_decoder)
    if not stage.train_lora:
        for name, param in model.language_model.named_parameters():
            if "lora_" in name:
                param.requires_grad = False
    model.freeze_projection(not stage.train_projector)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"stage {stage.name!r} trains nothing: enable the projector, LoRA, the encoder or the decoder")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())

"""Tiny random encoders and decoders of every family we claim, saved to folders like real checkpoints.

Tests load them through `create_speech_lm_model`, the path a user takes with hub ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    Data2VecAudioConfig,
    GemmaConfig,
    GPT2Config,
    HubertConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "transcribe the audio please", "set an alarm for seven thirty", "call mom tomorrow morning",
    "turn off the kitchen lights", "what is the weather in paris", "one two three four five six seven eight nine",
    "remind me to buy milk", "play some jazz music", "the quick brown fox jumps over the lazy dog",
]

_CONV = dict(conv_dim=(8, 8, 8, 8, 8, 8, 8), conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2))
_W2V_COMMON = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, mask_time_prob=0.0, layerdrop=0.0,
                   vocab_size=12, **_CONV)
ENCODERS = {
    "wav2vec2-group": lambda: Wav2Vec2Config(feat_extract_norm="group", do_stable_layer_norm=False, **_W2V_COMMON),
    "wav2vec2-layer": lambda: Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=True, **_W2V_COMMON),
    "hubert": lambda: HubertConfig(feat_extract_norm="layer", do_stable_layer_norm=True, **_W2V_COMMON),
    "wavlm": lambda: WavLMConfig(feat_extract_norm="layer", do_stable_layer_norm=True, num_buckets=32,
                                 max_bucket_distance=100, **_W2V_COMMON),
    "data2vec-audio": lambda: Data2VecAudioConfig(
        **{**_W2V_COMMON, "num_conv_pos_embeddings": 5}, conv_pos_kernel_size=5, num_conv_pos_embedding_layers=2
    ),
    "whisper": lambda: WhisperConfig(
        d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=32, num_mel_bins=16, max_source_positions=1500,
        max_target_positions=32, vocab_size=64, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, encoder_layerdrop=0.0,
    ),
}
_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=512, head_dim=8)
DECODERS = {
    "qwen2": lambda v: Qwen2Config(vocab_size=v, **_LM),
    "qwen3": lambda v: Qwen3Config(vocab_size=v, **_LM),
    "llama": lambda v: LlamaConfig(vocab_size=v, **_LM),
    "mistral": lambda v: MistralConfig(vocab_size=v, sliding_window=None, **_LM),
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=512),
    "gemma": lambda v: GemmaConfig(vocab_size=v, **_LM),
}


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with BOS/EOS and a ChatML template; GPT-2-like ones have no pad token."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"] + (["<pad>"] if pad else [])
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>" if pad else None)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def save_encoder(family: str, folder: Path) -> Path:
    torch.manual_seed(0)
    config = ENCODERS[family]()
    model = AutoModel.from_config(config)
    model.save_pretrained(folder)
    if family == "whisper":
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(folder)
    else:
        wants_mask = getattr(config, "feat_extract_norm", "layer") == "layer"
        Wav2Vec2FeatureExtractor(return_attention_mask=wants_mask).save_pretrained(folder)
    return folder


def save_decoder(family: str, folder: Path) -> Path:
    torch.manual_seed(0)
    tokenizer = make_tokenizer(pad=family != "gpt2")
    config = DECODERS[family](len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

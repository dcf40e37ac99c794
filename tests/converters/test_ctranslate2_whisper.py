"""CTranslate2 Whisper -> transformers Whisper (`speechlm.converters.ctranslate2_whisper`): the configuration,
tokenizer and generation settings inferred from the file, quantized weights, and variants the mapping refuses."""

from __future__ import annotations

import re

import torch

from speechlm.converters.ctranslate2 import (
    is_ctranslate2_whisper,
    load_ctranslate2_whisper,
    load_ctranslate2_whisper_encoder,
)
from tests.converters.conftest import ct2_folder, encode, expect_error, write_ct2


def test_config_is_inferred_from_the_tensor_shapes(loaded):
    feature_extractor, _, model = loaded
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (384, 4, 4)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (6, 6)
    assert (config.encoder_ffn_dim, config.num_mel_bins, config.vocab_size) == (1536, 80, 51864)
    assert (config.max_source_positions, config.max_target_positions) == (1500, 448)
    assert config.tie_word_embeddings and model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert not model.training and model.dtype == torch.float32
    assert feature_extractor.feature_size == 80


def test_tokenizer_has_whispers_control_and_timestamp_tokens(loaded):
    _, tokenizer, model = loaded
    assert len(tokenizer) == model.config.vocab_size
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", "<|startoftranscript|>")}
    assert ids == {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257}
    assert tokenizer.convert_tokens_to_ids("<|0.00|>") == 50363
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == model.config.eos_token_id == 50256
    encoded = tokenizer("Hello world").input_ids
    assert encoded[:2] == [50257, 50362] and encoded[-1] == 50256
    assert tokenizer.decode(encoded, skip_special_tokens=True).strip() == "Hello world"


def test_generation_config_has_whispers_settings(loaded):
    generation = loaded[2].generation_config
    assert generation.decoder_start_token_id == 50257 and generation.no_timestamps_token_id == 50362
    assert generation.is_multilingual is False and generation.alignment_heads


def test_int8_and_bfloat16_files_load(whisper_dir, loaded, features, tmp_path, ct2_variables):
    """faster-whisper int8 checkpoints store linear weights as round(w * scale) with one float scale per row."""
    variables, aliases = ct2_variables
    quantized = {}
    for name, tensor in variables.items():
        if re.search(r"linear_\d/weight$", name):
            weight = tensor.float()
            scale = 127.0 / weight.abs().amax(dim=1).clamp_min(1e-12)
            quantized[name] = torch.round(weight * scale[:, None]).to(torch.int8)
            quantized[f"{name}_scale"] = scale
        elif tensor.dtype == torch.float16:
            quantized[name] = tensor.to(torch.bfloat16)
        else:
            quantized[name] = tensor
    folder = ct2_folder(tmp_path, whisper_dir)
    write_ct2(folder / "model.bin", quantized, aliases)
    encoder = load_ctranslate2_whisper_encoder(folder)
    expected = encode(loaded[2].model.encoder, features)
    relative = (encode(encoder, features) - expected).norm() / expected.norm()
    assert relative < 0.05, relative
    assert load_ctranslate2_whisper(folder)[2].config.vocab_size == 51864


def test_variables_without_a_transformers_counterpart_are_refused(whisper_dir, tmp_path, ct2_variables):
    variables, aliases = ct2_variables
    low_rank = ct2_folder(tmp_path, whisper_dir, "low_rank")
    extra = {"encoder/layer_0/ffn/linear_0/weight_a": torch.zeros(8, 384, dtype=torch.float16)}
    write_ct2(low_rank / "model.bin", {**variables, **extra}, aliases)
    assert is_ctranslate2_whisper(low_rank)
    expect_error(low_rank, r"unsupported CTranslate2 Whisper variant.*linear_0/weight_a")

"""The base models under a SpeechLM model (speechlm/base_models.py): loading, new token rows, assembling our parts,
on the tiny real checkpoints of tests/tiny_models.py."""

from __future__ import annotations

import pytest
import torch

from speechlm import create_speech_lm_model
from speechlm.base_models import (
    AUDIO_TOKEN,
    BASE_MODELS_ROOT_ENV,
    PAD_TOKEN,
    add_special_tokens,
    load_decoder,
    resize_embeddings,
    resolve_base_model,
)
from speechlm.configuration import DEFAULT_GENERATION


def test_new_token_rows_are_the_mean_of_the_old_ones(model_dirs):
    """Not random: a trainable-only checkpoint does not store the frozen embeddings, so two loads must agree."""
    _, language_model = load_decoder(str(model_dirs("decoder", "qwen2")), with_tokenizer=False)
    old = language_model.get_input_embeddings().weight.shape[0]
    before = [layer.weight.detach().clone() for layer in (language_model.get_input_embeddings(),
                                                            language_model.get_output_embeddings())]
    resize_embeddings(language_model, old + 3)
    for layer, weight in zip((language_model.get_input_embeddings(), language_model.get_output_embeddings()), before):
        assert layer.weight.shape[0] == old + 3
        assert torch.equal(layer.weight[:old], weight)
        torch.testing.assert_close(layer.weight[old:], weight.mean(0).expand(3, -1))


def test_the_audio_token_and_a_missing_pad_token_are_added(model_dirs):
    tokenizer, language_model = load_decoder(str(model_dirs("decoder", "gpt2")))  # GPT-2 style: no pad token
    size = len(tokenizer)
    audio_id = add_special_tokens(tokenizer, language_model)
    assert tokenizer.convert_ids_to_tokens(audio_id) == AUDIO_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert len(tokenizer) == size + 2 == language_model.get_input_embeddings().weight.shape[0]
    assert language_model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer(f"hi {AUDIO_TOKEN}").input_ids[-1] == audio_id  # one token, never split


def test_a_recorded_relative_name_is_found_under_the_base_models_root(tmp_path, monkeypatch):
    (tmp_path / "llms" / "qwen2").mkdir(parents=True)
    monkeypatch.setenv(BASE_MODELS_ROOT_ENV, str(tmp_path / "llms"))
    assert resolve_base_model("qwen2") == str(tmp_path / "llms" / "qwen2")
    assert resolve_base_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # not there: a hub id
    monkeypatch.delenv(BASE_MODELS_ROOT_ENV)
    assert resolve_base_model("qwen2") == "qwen2"


def test_our_parts_follow_the_llms_dtype_and_a_new_model_decodes_greedily(model_dirs):
    _, _, model = create_speech_lm_model(str(model_dirs("encoder", "whisper")), str(model_dirs("decoder", "qwen2")),
                                         projection_hidden_size=32, dtype=torch.bfloat16)
    assert {p.dtype for p in model.multi_modal_projector.parameters()} == {torch.bfloat16}
    assert model.audio_start.dtype == model.audio_end.dtype == torch.bfloat16
    generation = model.generation_config
    assert {name: getattr(generation, name) for name in DEFAULT_GENERATION} == DEFAULT_GENERATION
    assert generation.temperature is None and generation.top_p is None and generation.top_k is None
    assert generation.pad_token_id == model.config.text_config.pad_token_id


def test_an_encoder_decoder_folder_is_refused_as_the_decoder(model_dirs):
    from speechlm.base_models import load_decoder

    with pytest.raises(ValueError, match="encoder-decoder"):
        load_decoder(str(model_dirs("encoder", "whisper")))


def test_hub_kernels_stay_off_in_every_loaded_part(model_dirs, tmp_path):
    """transformers turns its hub kernels on by default where `kernels` is installed; on a GPU the next `train()`
    then fetches kernel code from the hub (offline: ValueError at `model.train()`). SpeechLM loads with them off."""
    pytest.importorskip("kernels")
    _, _, model = create_speech_lm_model(str(model_dirs("encoder", "whisper")), str(model_dirs("decoder", "llama")),
                                         projection_hidden_size=32)
    assert not model.language_model.use_kernels and not model.audio_tower.use_kernels
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert not reloaded.use_kernels and not reloaded.language_model.use_kernels

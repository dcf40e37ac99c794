"""The frozen-encoder cache: a cached forward gives the uncached loss, and keys follow the file and the encoder."""

from __future__ import annotations

import os

import pytest
import torch

from speechlm.data.dataset import SpeechLMCollator, SpeechLMDataset
from speechlm.data.encoder_cache import EncoderCache
from speechlm.data.manifests import read_manifest


def test_encoder_cache_gives_the_same_loss(build, corpus, tmp_path):
    processor, model = build("whisper", "qwen2")
    model.freeze_encoder()
    _, manifest, _ = corpus
    records = read_manifest(manifest)
    plain = SpeechLMDataset(records, processor.sampling_rate)
    reference = SpeechLMCollator(processor)([plain[i] for i in range(3)])
    for directory in (None, tmp_path / "frames"):
        cache = EncoderCache.for_model(model, processor, "disk" if directory else "memory", directory)
        cached_set = SpeechLMDataset(records, processor.sampling_rate, encoder_cache=cache)
        assert "audio" in cached_set[0]  # nothing cached yet
        assert cache.fill(model, processor, cached_set, batch_size=2, progress=False) == 3
        assert cache.fill(model, processor, cached_set, batch_size=2, progress=False) == 0  # computed once
        items = [cached_set[i] for i in range(3)]
        assert all("audio" not in item and "cache_key" in item for item in items)  # no audio decoded any more
        batch = SpeechLMCollator(processor, encoder_cache=cache)(items)
        assert set(batch) == {"encoder_frames", "encoder_frame_lengths", "input_ids", "decoder_attention_mask",
                              "labels"}
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).loss, model(**reference).loss)
    assert len(list((tmp_path / "frames").glob("*/*.safetensors"))) == 3


def test_encoder_cache_keys_follow_file_and_encoder(build, corpus):
    processor, model = build("whisper", "qwen2")
    model.freeze_encoder()
    _, manifest, _ = corpus
    record = read_manifest(manifest)[0]
    cache = EncoderCache.for_model(model, processor)
    key = cache.key(record)
    stat = os.stat(record["audio"])
    os.utime(record["audio"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.key(record) != key  # an edited file is a miss, never a stale hit
    with torch.no_grad():
        next(model.audio_tower.parameters()).add_(1.0)
    assert EncoderCache.for_model(model, processor).fingerprint != cache.fingerprint
    model.unfreeze_encoder()
    with pytest.raises(ValueError, match="encoder is being trained"):
        EncoderCache.for_model(model, processor)


def test_a_storage_dtype_keeps_the_frames_rounded_to_it():
    cache = EncoderCache("encoder", dtype=torch.float16)
    frames = torch.randn(5, 4)
    cache.put("clip", frames)
    assert torch.equal(cache.get("clip"), frames.half())


def test_an_in_memory_cache_saved_as_one_file_loads_back(tmp_path):
    cache = EncoderCache("encoder")
    cache.put("a", torch.randn(5, 4))
    cache.put("b", torch.randn(3, 4))
    cache.save(tmp_path / "frames.safetensors", keys=["a"])
    again = EncoderCache("encoder")
    assert again.load(tmp_path / "frames.safetensors") == 1
    assert torch.equal(again.get("a"), cache.get("a")) and "b" not in again


def test_a_cache_file_of_another_encoder_loads_nothing(tmp_path):
    cache = EncoderCache("encoder")
    cache.put("a", torch.randn(5, 4))
    cache.save(tmp_path / "frames.safetensors")
    assert EncoderCache("another encoder").load(tmp_path / "frames.safetensors") == 0

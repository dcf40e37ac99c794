"""Long audio: streaming silence splitting and chunked decoding (`speechlm.inference.segmentation`)."""

from __future__ import annotations

import math
from itertools import islice

import numpy as np
import pytest

import speechlm.audio
import speechlm.inference.segmentation as segmentation
from speechlm.audio import iter_audio_blocks
from speechlm.inference.decoding import transcribe_arrays
from speechlm.inference.formats import Segment
from speechlm.inference.segmentation import SilenceSplitter, iter_transcribe_long, split_on_silence, transcribe_long
from tests.inference.conftest import SR, needs_espeak


def covering(chunks, start, end):
    return [c for c in chunks if c.start <= start + 0.05 and c.end >= end - 0.25]


# ------------------------------------------------------------------------------------------------ splitting
@needs_espeak
def test_split_on_silence_finds_every_sentence(recording):
    path, intervals = recording
    chunks = list(split_on_silence(iter_audio_blocks(path, 4.0, SR), SR, max_chunk_seconds=25))
    assert len(chunks) == len(intervals)
    for chunk, (start, end) in zip(chunks, intervals):
        assert covering([chunk], start, end), (chunk.start, chunk.end, start, end)
        assert chunk.end - chunk.start <= 25
        assert math.isclose(len(chunk.audio) / SR, chunk.end - chunk.start)
    starts = [chunk.start for chunk in chunks]
    assert starts == sorted(starts)
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:]))


@needs_espeak
def test_speech_longer_than_max_is_cut_below_max(recording):
    path, intervals = recording
    # Silences never end a chunk here (min 5 s), so only the max-length cut splits the speech.
    splitter = SilenceSplitter(SR, max_chunk_seconds=3.0, min_silence_seconds=5.0)
    chunks = []
    for block in iter_audio_blocks(path, 1.0, SR):
        chunks += splitter.push(block)
    chunks += splitter.flush()
    assert max(chunk.end - chunk.start for chunk in chunks) <= 3.0
    assert all(a.end <= b.start + 1e-9 for a, b in zip(chunks, chunks[1:]))
    # Nothing of the speech is lost: every sentence's samples lie in the chunks.
    for start, end in intervals:
        inside = sum(max(0.0, min(c.end, end - 0.25) - max(c.start, start)) for c in chunks)
        assert inside >= (end - 0.25 - start) - 1e-6


def test_silence_gives_no_chunks():
    quiet = np.zeros(5 * SR, dtype=np.float32)
    assert list(split_on_silence([quiet], SR)) == []


def test_rates_silero_cannot_take_are_refused():
    with pytest.raises(ValueError, match="8 or 16 kHz"):
        SilenceSplitter(22050)


@needs_espeak
def test_splitter_memory_is_bounded(recording):
    path, _ = recording
    splitter = SilenceSplitter(SR, max_chunk_seconds=10.0)
    total = 0
    for block in iter_audio_blocks(path, 2.0, SR):
        total += len(block)
        splitter.push(block)
    splitter.flush()
    assert total > 110 * SR
    assert splitter.peak_buffered_samples <= (10.0 + 2.0 + 0.5) * SR


# ------------------------------------------------------------------------------------------------ transcribe_long
@needs_espeak
def test_transcribe_long_streams_and_batches(recording, whisper_qwen, monkeypatch):
    processor, model = whisper_qwen
    path, intervals = recording
    read = {"blocks": 0}
    real_blocks = speechlm.audio.iter_audio_blocks

    def counting_blocks(*args, **kwargs):
        for block in real_blocks(*args, **kwargs):
            read["blocks"] += 1
            yield block

    calls = []

    def spy(model, processor, audios, *args, **kwargs):
        calls.append((len(audios), read["blocks"]))
        return transcribe_arrays(model, processor, audios, *args, **kwargs)

    monkeypatch.setattr(speechlm.audio, "iter_audio_blocks", counting_blocks)
    monkeypatch.setattr(segmentation, "transcribe_arrays", spy)
    segments = transcribe_long(model, processor, path, batch_size=10, max_new_tokens=2)
    total_blocks = read["blocks"]

    assert len(segments) == len(intervals)
    sizes = [size for size, _ in calls]
    assert sizes[:-1] == [10] * (len(sizes) - 1) and 0 < sizes[-1] <= 10 and sum(sizes) == len(intervals)
    # Decoding starts long before the file has been read: the first batch needs only its first ~10 sentences.
    assert calls[0][1] < total_blocks / 2
    for segment, (start, end) in zip(segments, intervals):
        assert isinstance(segment, Segment) and isinstance(segment.text, str)
        assert segment.start <= start + 0.05 and segment.end >= end - 0.25


@needs_espeak
def test_transcribe_long_reads_as_decoding_every_chunk_alone(recording, whisper_qwen):
    processor, model = whisper_qwen
    path, _ = recording
    # The first three segments come out of the first batch of ten: stop there.
    segments = list(islice(iter_transcribe_long(model, processor, path, batch_size=10, max_new_tokens=2), 3))
    chunks = islice(split_on_silence(iter_audio_blocks(path, 4.0, SR), SR), 3)
    alone = [transcribe_arrays(model, processor, [c.audio], max_new_tokens=2)[0] for c in chunks]
    assert [segment.text for segment in segments] == alone


def test_transcribe_long_reports_bad_files(whisper_qwen, tmp_path):
    processor, model = whisper_qwen
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(speechlm.audio.AudioError, match="broken.wav"):
        transcribe_long(model, processor, bad)

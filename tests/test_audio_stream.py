"""Streaming a long file in blocks (speechlm/audio_stream.py, `iter_audio_blocks` re-exported by speechlm.audio)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import soundfile as sf

from speechlm import audio
from speechlm.audio import AudioError, iter_audio_blocks, load_audio
from tests.audio_files import files_fixture, needs_ffmpeg  # noqa: F401 (the `files` fixture)


def test_streaming_blocks_match_whole_file(files):
    blocks = list(iter_audio_blocks(files["long44k.wav"], block_seconds=1.5))
    assert [block.size for block in blocks] == [24000, 24000, 24000, 8000]
    assert all(block.dtype == np.float32 for block in blocks)
    whole = load_audio(files["long44k.wav"])
    streamed = np.concatenate(blocks)
    assert streamed.size == whole.size
    np.testing.assert_allclose(streamed, whole, atol=1e-4)


def test_streaming_does_not_read_ahead(files, monkeypatch):
    frames_read = []

    class CountingSoundFile(sf.SoundFile):
        def read(self, frames=-1, *args, **kwargs):
            data = super().read(frames, *args, **kwargs)
            frames_read.append(len(data))
            return data

    monkeypatch.setattr(audio.sf, "SoundFile", CountingSoundFile)
    blocks = iter_audio_blocks(files["long44k.wav"], block_seconds=0.5)
    first = next(blocks)
    assert first.size == 8000
    total = sf.info(files["long44k.wav"]).frames
    assert 0 < sum(frames_read) <= 2 * 22050 < total  # one or two reads of a block, not the whole file
    blocks.close()


def test_streaming_same_rate_is_exact(files):
    blocks = list(iter_audio_blocks(files["mono16k.wav"], block_seconds=0.3))
    np.testing.assert_array_equal(np.concatenate(blocks), load_audio(files["mono16k.wav"]))


@needs_ffmpeg
def test_streaming_mp3_through_ffmpeg_and_early_close(files, monkeypatch):
    blocks = list(iter_audio_blocks(files["long.mp3"], block_seconds=2.0))
    assert [block.size for block in blocks[:2]] == [32000, 32000]
    np.testing.assert_allclose(np.concatenate(blocks), load_audio(files["long.mp3"]), atol=1e-6)

    processes = []
    original = subprocess.Popen
    monkeypatch.setattr(audio.subprocess, "Popen", lambda *a, **k: processes.append(original(*a, **k)) or processes[-1])
    stream = iter_audio_blocks(files["long.mp3"], block_seconds=1.0)
    next(stream)
    stream.close()
    assert len(processes) == 1 and processes[0].poll() is not None  # ffmpeg does not outlive the consumer


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("missing.wav", "file not found"),
        ("not_audio.wav", "not a readable audio file"),
        ("truncated_data.wav", "truncated WAV"),
        ("empty.wav", "contains no audio samples"),
        ("nan.wav", "NaN sample(s), the first at 0.500 s"),
    ],
)
def test_streaming_errors(files, name, problem):
    with pytest.raises(AudioError) as info:
        list(iter_audio_blocks(files[name], block_seconds=0.25))
    assert name in str(info.value) and problem in str(info.value), str(info.value)


def test_streaming_is_reexported_by_speechlm_audio():
    from speechlm import audio_stream

    assert audio.iter_audio_blocks is audio_stream.iter_audio_blocks

"""Streaming a long file as fixed-size blocks (`iter_audio_blocks`, re-exported by `speechlm.audio`): soundfile
through a streaming soxr resampler, or an ffmpeg pipe, holding about one block in memory."""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .audio_decoders import (
    _FFMPEG_FIRST,
    AudioError,
    _check_wav_truncation,
    _ffmpeg,
    _ffmpeg_command,
    _ffmpeg_reason,
    _finite_problem,
    _resolve,
    _soundfile_reason,
)


class _Rebuffer:
    """Collects variable-size chunks (a streaming resampler's output) and hands back fixed-size blocks."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.chunks: list[np.ndarray] = []
        self.size = 0

    def push(self, chunk: np.ndarray) -> Iterator[np.ndarray]:
        if chunk.size:
            self.chunks.append(chunk)
            self.size += chunk.size
        while self.size >= self.block_size:
            joined = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
            yield np.ascontiguousarray(joined[: self.block_size], dtype=np.float32)
            rest = joined[self.block_size :]
            self.chunks, self.size = ([rest] if rest.size else []), rest.size

    def flush(self) -> Iterator[np.ndarray]:
        if self.size:
            yield np.ascontiguousarray(np.concatenate(self.chunks), dtype=np.float32)
        self.chunks, self.size = [], 0


def _stream_soundfile(handle: sf.SoundFile, name: str, block_size: int, sampling_rate: int) -> Iterator[np.ndarray]:
    native_rate = handle.samplerate
    resampler = None
    if native_rate != sampling_rate:
        resampler = soxr.ResampleStream(native_rate, sampling_rate, 1, dtype="float32", quality="HQ")
    frames_per_read = max(1, math.ceil(block_size * native_rate / sampling_rate))
    buffer = _Rebuffer(block_size)
    position = 0
    while True:
        try:
            data = handle.read(frames_per_read, dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError) as error:
            reason = _soundfile_reason(error)
            raise AudioError(name, f"corrupt after {position / native_rate:.3f} s ({reason})") from None
        last = len(data) < frames_per_read
        mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
        if problem := _finite_problem(mono, native_rate, position):
            raise AudioError(name, problem)
        position += len(mono)
        out = resampler.resample_chunk(np.ascontiguousarray(mono), last=last) if resampler else mono
        yield from buffer.push(out)
        if last:
            break
    yield from buffer.flush()


def _stream_ffmpeg(path: Path, name: str, block_size: int, sampling_rate: int) -> Iterator[np.ndarray]:
    ffmpeg = _ffmpeg()
    assert ffmpeg is not None
    command = _ffmpeg_command(ffmpeg, str(path), sampling_rate)
    # stderr goes to a file: an undrained pipe could fill up and stall ffmpeg on a file full of decode errors.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        try:
            position = 0
            while True:
                raw = process.stdout.read(block_size * 4)
                if not raw:
                    break
                block = np.frombuffer(raw[: len(raw) - len(raw) % 4], dtype="<f4").astype(np.float32)
                if problem := _finite_problem(block, sampling_rate, position):
                    raise AudioError(name, problem)
                position += block.size
                yield block
            if process.wait() != 0:
                stderr.seek(0)
                reason = _ffmpeg_reason(stderr.read(), str(path))
                where = f"after {position / sampling_rate:.3f} s " if position else ""
                raise AudioError(name, f"not a readable audio file or corrupt {where}(ffmpeg: {reason})")
        finally:
            # Also reached when the consumer stops early (generator closed): do not leave ffmpeg running.
            if process.poll() is None:
                process.kill()
            process.stdout.close()
            process.wait()


def iter_audio_blocks(
    path: str | os.PathLike, block_seconds: float, sampling_rate: int = 16000, *, name: str | None = None
) -> Iterator[np.ndarray]:
    """Stream a long file as mono float32 blocks at `sampling_rate`, holding about one block in memory.

    Every block has exactly `round(block_seconds * sampling_rate)` samples except the last, which is shorter (never
    empty). soundfile reads the file block by block through a streaming soxr resampler, so the concatenated blocks
    match `load_audio` up to the resampler's edge effects; other formats stream from an ffmpeg pipe. Raises
    `AudioError` for the problems `load_audio` reports, NaN blocks included (with their time offset); being a
    generator, it reports them on the first `next()`, not on the call.
    """
    if block_seconds <= 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds}")
    block_size = max(1, round(block_seconds * sampling_rate))
    source, display, suffix = _resolve(path, name)
    assert isinstance(source, Path)
    ffmpeg_available = _ffmpeg() is not None
    handle, soundfile_reason = None, None
    if not (suffix in _FFMPEG_FIRST and ffmpeg_available):
        try:
            handle = sf.SoundFile(source)
            if handle.format in ("WAV", "WAVEX"):
                _check_wav_truncation(source, display)
        except (sf.SoundFileError, RuntimeError) as error:
            soundfile_reason = _soundfile_reason(error)
        except AudioError:
            if handle is not None:
                handle.close()
            raise
    if handle is not None:
        with handle:
            blocks = _stream_soundfile(handle, display, block_size, sampling_rate)
            yielded = yield from _count(blocks)
    elif ffmpeg_available:
        yielded = yield from _count(_stream_ffmpeg(source, display, block_size, sampling_rate))
    else:
        raise AudioError(
            display, f"not a readable audio file (soundfile: {soundfile_reason}); install ffmpeg for other formats"
        )
    if not yielded:
        raise AudioError(display, "contains no audio samples (0 frames)")


def _count(blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Re-yield `blocks` and return how many there were (the value of `yield from`)."""
    count = 0
    for block in blocks:
        count += 1
        yield block
    return count

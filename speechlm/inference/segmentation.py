"""Long audio: a streaming voice-activity detector (silero-vad) cuts a recording on silence into chunks the encoder
can take, and the chunks are decoded in batches as they arrive.

An hours-long file is read, segmented and decoded block by block, never held whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..modeling import SpeechLMModel
from ..processing import SpeechLMProcessor
from .decoding import transcribe_arrays
from .formats import Segment


@dataclass
class SpeechChunk:
    """Audio cut out of a longer recording, `start` seconds from its beginning, ready for the encoder."""

    start: float
    audio: np.ndarray
    sampling_rate: int

    @property
    def end(self) -> float:
        return self.start + len(self.audio) / self.sampling_rate


def load_vad_model():
    """silero-vad's TorchScript model (shipped inside the package, no download).

    Importing silero_vad calls `torch.set_num_threads(1)` as a side effect; the caller's thread count is restored so
    that loading the VAD does not slow the speech model down.
    """
    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad
    finally:
        torch.set_num_threads(threads)
    return load_silero_vad(onnx=False)


class SilenceSplitter:
    """Streaming segmentation on silence: `push` blocks of any size, get `SpeechChunk`s as soon as they are complete.

    Speech starts when the VAD probability reaches `threshold` and ends after `min_silence_seconds` below
    `threshold - 0.15` (hysteresis, as in silero's own iterator). Chunks get `speech_pad_seconds` of context on each
    silence side. A stretch of speech longer than `max_chunk_seconds` (padding included) is cut at its quietest frame
    in the second half of the window, preferring frames the VAD calls non-speech, so a chunk always fits the encoder.
    Blips shorter than `min_speech_seconds` are dropped. Only about `max_chunk_seconds` plus one block of audio is
    ever buffered (`peak_buffered_samples` says how much was), whatever the recording's length.

    The VAD runs one 32 ms frame per call, where intra-op threads only add synchronisation (several times slower on a
    busy machine). With `vad_threads` (default 1) torch's thread count is set to it during `push`/`flush` and then
    restored; that setting is process-wide, so pass `vad_threads=None` where other threads run models concurrently.
    """

    def __init__(
        self,
        sampling_rate: int = 16000,
        max_chunk_seconds: float = 25.0,
        min_silence_seconds: float = 0.5,
        min_speech_seconds: float = 0.25,
        speech_pad_seconds: float = 0.2,
        threshold: float = 0.5,
        vad_model=None,
        vad_threads: int | None = 1,
    ):
        if sampling_rate not in (8000, 16000):
            raise ValueError(f"silence splitting (silero-vad) needs 8 or 16 kHz audio, got {sampling_rate} Hz")
        self.sampling_rate = sampling_rate
        self.frame = 512 if sampling_rate == 16000 else 256  # silero's fixed window
        self.pad = round(speech_pad_seconds * sampling_rate)
        self.max_region = round(max_chunk_seconds * sampling_rate) - 2 * self.pad
        if self.max_region < 4 * self.frame:
            raise ValueError(
                f"max_chunk_seconds={max_chunk_seconds:g} leaves no room for speech with "
                f"speech_pad_seconds={speech_pad_seconds:g}"
            )
        self.min_silence = round(min_silence_seconds * sampling_rate)
        self.min_speech = round(min_speech_seconds * sampling_rate)
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        self.vad = vad_model if vad_model is not None else load_vad_model()
        self.vad.reset_states()
        self.vad_threads = vad_threads
        self.peak_buffered_samples = 0
        self._buffer = np.zeros(0, dtype=np.float32)
        self._offset = 0  # absolute index of _buffer[0]
        self._position = 0  # samples already seen by the VAD
        self._start: int | None = None  # start of the speech region in progress
        self._padded = False  # the region began after silence (so it gets leading context)
        self._silence: int | None = None  # start of the silence inside the region, if any
        self._frames: list[tuple[int, float, float]] = []  # (start, speech probability, rms) of the region's frames
        self._last_end = 0  # end of the last chunk: padding never overlaps it

    def push(self, block: np.ndarray) -> list[SpeechChunk]:
        """Feed the next block of mono float32 audio; returns the chunks it completed (often none)."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        self._buffer = np.concatenate([self._buffer, block]) if self._buffer.size else block
        self.peak_buffered_samples = max(self.peak_buffered_samples, self._buffer.size)
        chunks = []
        end = self._offset + self._buffer.size
        with _torch_threads(self.vad_threads):
            while self._position + self.frame <= end:
                chunks += self._step(self._position)
                self._position += self.frame
        self._trim()
        return chunks

    def flush(self) -> list[SpeechChunk]:
        """End of the recording: the last partial frame and the speech still in progress."""
        end = self._offset + self._buffer.size
        chunks = []
        if self._position < end:
            with _torch_threads(self.vad_threads):
                chunks += self._step(self._position)
            self._position = end
        if self._start is not None:
            stop = self._silence if self._silence is not None else end
            chunks += self._emit(self._start, stop, pad_end=self._silence is not None)
            self._start = None
        self._buffer, self._offset = np.zeros(0, dtype=np.float32), end
        return chunks

    def _slice(self, begin: int, end: int) -> np.ndarray:
        return self._buffer[begin - self._offset : end - self._offset]

    def _step(self, sample: int) -> list[SpeechChunk]:
        frame = self._slice(sample, sample + self.frame)
        rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64))))
        if frame.size < self.frame:
            frame = np.pad(frame, (0, self.frame - frame.size))
        with torch.inference_mode():  # with autograd on, every call of the TorchScript VAD is ~30x slower
            probability = float(self.vad(torch.from_numpy(np.ascontiguousarray(frame)), self.sampling_rate))
        frame_end = sample + self.frame
        if self._start is None:
            if probability >= self.threshold:
                self._start, self._padded, self._silence = sample, True, None
                self._frames = [(sample, probability, rms)]
            return []
        self._frames.append((sample, probability, rms))
        if probability < self.neg_threshold:
            self._silence = sample if self._silence is None else self._silence
        elif probability >= self.threshold:
            self._silence = None
        if self._silence is not None and frame_end - self._silence >= self.min_silence:
            chunks = self._emit(self._start, self._silence, pad_end=True)
            self._start, self._frames = None, []
            return chunks
        if frame_end - self._start >= self.max_region:
            cut = self._quietest_point()
            chunks = self._emit(self._start, cut, pad_end=False)
            self._start, self._padded = cut, False
            self._frames = [entry for entry in self._frames if entry[0] >= cut]
            if self._silence is not None:
                self._silence = max(self._silence, cut)
            return chunks
        return []

    def _quietest_point(self) -> int:
        """Where to cut an over-long region: the quietest frame of its second half, pauses (non-speech) first."""
        earliest = self._start + self.max_region // 2
        candidates = [entry for entry in self._frames if entry[0] >= earliest] or self._frames[-1:]
        pauses = [entry for entry in candidates if entry[1] < self.threshold]
        start, _, _ = min(pauses or candidates, key=lambda entry: entry[2])
        return max(self._start + self.frame, start + self.frame // 2)

    def _emit(self, start: int, stop: int, pad_end: bool) -> list[SpeechChunk]:
        if self._padded and stop - start < self.min_speech:
            return []  # a click or breath, not speech
        begin = max(start - self.pad if self._padded else start, self._last_end, self._offset)
        available = self._offset + self._buffer.size
        end = min(stop + self.pad, available) if pad_end else stop
        self._last_end = end
        return [SpeechChunk(begin / self.sampling_rate, self._slice(begin, end).copy(), self.sampling_rate)]

    def _trim(self) -> None:
        keep = (self._start if self._start is not None else self._position) - self.pad
        keep = min(max(keep, self._offset), self._offset + self._buffer.size)
        if keep > self._offset:
            self._buffer = self._buffer[keep - self._offset :]
            self._offset = keep


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def split_on_silence(blocks: Iterable[np.ndarray], sampling_rate: int = 16000, **options) -> Iterator[SpeechChunk]:
    """Lazily turn a stream of audio blocks into speech chunks (`SilenceSplitter` options as keywords)."""
    splitter = SilenceSplitter(sampling_rate, **options)
    for block in blocks:
        yield from splitter.push(block)
    yield from splitter.flush()


def array_blocks(audio: np.ndarray, block_seconds: float = 4.0, sampling_rate: int = 16000) -> Iterator[np.ndarray]:
    """An in-memory recording as the blocks `split_on_silence` takes (the server's uploads)."""
    size = max(1, round(block_seconds * sampling_rate))
    for start in range(0, len(audio), size):
        yield audio[start : start + size]


def iter_transcribe_chunks(
    model: SpeechLMModel,
    processor: SpeechLMProcessor,
    chunks: Iterable[SpeechChunk],
    prompt: str | None = None,
    batch_size: int = 8,
    **generate_kwargs,
) -> Iterator[Segment]:
    """Decode chunks `batch_size` at a time as they arrive, yielding segments in time order."""
    pending: list[SpeechChunk] = []

    def decode() -> list[Segment]:
        texts = transcribe_arrays(
            model, processor, [chunk.audio for chunk in pending], prompt, batch_size, **generate_kwargs
        )
        return [Segment(round(c.start, 3), round(c.end, 3), text) for c, text in zip(pending, texts)]

    for chunk in chunks:
        pending.append(chunk)
        if len(pending) >= batch_size:
            yield from decode()
            pending = []
    if pending:
        yield from decode()


def iter_transcribe_long(
    model: SpeechLMModel,
    processor: SpeechLMProcessor,
    path: str | Path,
    prompt: str | None = None,
    batch_size: int = 8,
    max_chunk_seconds: float = 25.0,
    min_silence_seconds: float = 0.5,
    speech_pad_seconds: float = 0.2,
    vad_threshold: float = 0.5,
    block_seconds: float = 4.0,
    **generate_kwargs,
) -> Iterator[Segment]:
    """`transcribe_long` as a generator: segments come out while the rest of the file is still unread."""
    from ..audio import iter_audio_blocks

    blocks = iter_audio_blocks(path, block_seconds, processor.sampling_rate)
    chunks = split_on_silence(
        blocks,
        processor.sampling_rate,
        max_chunk_seconds=max_chunk_seconds,
        min_silence_seconds=min_silence_seconds,
        speech_pad_seconds=speech_pad_seconds,
        threshold=vad_threshold,
    )
    yield from iter_transcribe_chunks(model, processor, chunks, prompt, batch_size, **generate_kwargs)


def transcribe_long(
    model: SpeechLMModel, processor: SpeechLMProcessor, path: str | Path, prompt: str | None = None, **kwargs
) -> list[Segment]:
    """Transcribe a recording of any length: stream it, cut it on silence, decode the chunks in batches.

    Chunks are at most `max_chunk_seconds` (default 25 s, under Whisper's 30 s window); memory stays at a few
    chunks whatever the file's length. Keywords are `iter_transcribe_long`'s (VAD options, `batch_size`) and
    generation options (`max_new_tokens`, `num_beams`, ...). Raises `AudioError` for unreadable or corrupt files.
    """
    return list(iter_transcribe_long(model, processor, path, prompt, **kwargs))


__all__ = [
    "SilenceSplitter",
    "SpeechChunk",
    "array_blocks",
    "iter_transcribe_chunks",
    "iter_transcribe_long",
    "load_vad_model",
    "split_on_silence",
    "transcribe_long",
]

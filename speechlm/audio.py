"""Audio I/O shared by training data, the transcription CLI and the HTTP server.

Everything returns mono float32 at one sampling rate, and every bad input raises `AudioError` with a message that names
the input and the problem, so that a data pipeline can log and skip a file and a server can answer 400 with a useful
text instead of a stack trace.

wav/flac/ogg are decoded by soundfile (libsndfile, in-process, fast). mp3/m4a/webm and anything libsndfile cannot read
go through an `ffmpeg` subprocess; ffmpeg is optional, and only the formats that need it fail without it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

__all__ = [
    "AudioError",
    "audio_duration",
    "iter_audio_blocks",
    "load_audio",
    "resample_audio",
    "validate_audio",
]

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

# Extensions decoded by ffmpeg first even though recent libsndfile reads some of them (mp3): ffmpeg handles encoder
# delay/padding and exotic variants consistently, and libsndfile's mp3 support depends on how it was built.
_FFMPEG_FIRST = {
    ".3gp", ".aac", ".amr", ".avi", ".m4a", ".m4b", ".mkv", ".mov", ".mp2", ".mp3", ".mp4", ".mpeg", ".mpga", ".oga",
    ".opus", ".wma", ".weba", ".webm",
}  # fmt: skip
# Peak amplitude below one 16-bit quantisation step: what "digital silence" looks like after any decoder.
_SILENCE_PEAK = 1.0 / 32768
# Full scale of the integer PCM dtypes, so int16 arrays from scipy/wave are scaled like soundfile would.
_PCM_SCALE = {np.dtype(np.int8): 2.0**7, np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}
# A 2-D array whose smaller dimension is at most this many is (channels, samples) or (samples, channels).
_MAX_CHANNELS = 8


class AudioError(ValueError):
    """Audio that cannot be used, with `name` (the file or upload) and `problem` (what is wrong with it)."""

    def __init__(self, name: str, problem: str):
        self.name = name
        self.problem = problem
        super().__init__(f"{name}: {problem}")

    def __reduce__(self):
        # Keep the two-argument constructor picklable: DataLoader workers send exceptions across processes.
        return type(self), (self.name, self.problem)


def _ffmpeg() -> str | None:
    return shutil.which("ffmpeg")


def _ffprobe() -> str | None:
    return shutil.which("ffprobe")


# --------------------------------------------------------------------------------------------------------------------
# Arrays


def resample_audio(array: np.ndarray, orig_sampling_rate: int, target_sampling_rate: int) -> np.ndarray:
    """Resample mono float32 audio with soxr's high-quality filter; a no-op when the rates match."""
    array = np.asarray(array, dtype=np.float32)
    if orig_sampling_rate == target_sampling_rate or array.size == 0:
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(soxr.resample(array, orig_sampling_rate, target_sampling_rate, quality="HQ"))


def _as_float_array(array: Any, name: str) -> np.ndarray:
    """Any array-like (list, numpy, torch without importing it) to float32, scaling integer PCM to [-1, 1]."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor; bfloat16 has no numpy dtype
        tensor = array.detach().cpu()
        array = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    try:
        array = np.asarray(array)
    except ValueError as error:  # ragged nested lists
        raise AudioError(name, f"not an audio array ({error})") from None
    kind = array.dtype.kind
    if kind == "f":
        return array.astype(np.float32, copy=False)
    if array.dtype in _PCM_SCALE:
        return (array.astype(np.float32) / _PCM_SCALE[array.dtype]).astype(np.float32)
    if array.dtype == np.uint8:  # 8-bit WAV convention: unsigned, centred on 128
        return ((array.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if kind in "iu":
        # int64 (what a Python list of ints becomes) has no standard full scale: accept it only when it already lies
        # in [-1, 1], rather than silently producing samples in the thousands.
        if array.size == 0 or np.abs(array).max() <= 1:
            return array.astype(np.float32)
        raise AudioError(
            name, f"integer samples of dtype {array.dtype} have no standard full scale; pass float in [-1, 1] or int16"
        )
    raise AudioError(name, f"samples must be real numbers, got dtype {array.dtype}")


def _to_mono(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 1:
        return array
    if array.ndim != 2:
        raise AudioError(name, f"expected a 1-D or 2-D audio array, got shape {tuple(array.shape)}")
    rows, cols = array.shape
    if min(rows, cols) > _MAX_CHANNELS:
        raise AudioError(
            name,
            f"ambiguous audio shape {tuple(array.shape)}: a 2-D array needs one dimension of at most "
            f"{_MAX_CHANNELS} channels",
        )
    # The smaller dimension holds the channels; a square array is taken as (channels, samples), torchaudio's layout.
    axis = 0 if rows <= cols else 1
    if array.shape[axis] == 1:
        return array.reshape(-1)
    return array.mean(axis=axis, dtype=np.float32)


def _finite_problem(array: np.ndarray, sampling_rate: int, offset_samples: int = 0) -> str | None:
    finite = np.isfinite(array)
    if finite.all():
        return None
    n_nan = int(np.isnan(array).sum())
    n_inf = int(array.size - finite.sum()) - n_nan
    first = (offset_samples + int(np.argmin(finite))) / sampling_rate
    parts = [f"{n_nan} NaN" if n_nan else "", f"{n_inf} infinite" if n_inf else ""]
    return f"contains {' and '.join(p for p in parts if p)} sample(s), the first at {first:.3f} s"


def _duration_problem(duration: float, min_seconds: float | None, max_seconds: float | None) -> str | None:
    if min_seconds is not None and duration < min_seconds:
        return f"audio is {duration:.3f} s long, shorter than min_seconds={min_seconds:g}"
    if max_seconds is not None and duration > max_seconds:
        return f"audio is {duration:.3f} s long, longer than max_seconds={max_seconds:g}"
    return None


def validate_audio(
    array: Any,
    sampling_rate: int,
    *,
    name: str = "<array>",
    min_seconds: float | None = None,
    max_seconds: float | None = None,
    reject_silence: bool = False,
    target_sampling_rate: int | None = None,
) -> np.ndarray:
    """Check audio a caller passes as an array and return it as contiguous mono float32.

    Accepts lists, numpy arrays and torch tensors, 1-D or 2-D. A 2-D array is (channels, samples) or
    (samples, channels): its smaller dimension, which must be at most 8, is taken as channels and averaged away.
    Integer int8/int16/int32/uint8 samples are PCM and scaled to [-1, 1].

    Raises `AudioError` for an empty array, NaN or infinite samples, and audio outside `[min_seconds, max_seconds]`
    (durations at `sampling_rate`). Silence is valid input (a silent clip should transcribe to nothing, and silent
    stretches are normal in recordings), so it is only an error with `reject_silence=True`, e.g. to catch a muted
    microphone; "silent" means every sample is below one 16-bit step.

    With `target_sampling_rate`, the result is resampled to it (after the checks, so NaNs never reach the resampler).
    """
    if sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be positive, got {sampling_rate}")
    array = _to_mono(_as_float_array(array, name), name)
    if array.size == 0:
        raise AudioError(name, "contains no audio samples (0 frames)")
    if problem := _finite_problem(array, sampling_rate):
        raise AudioError(name, problem)
    if reject_silence and float(np.abs(array).max()) < _SILENCE_PEAK:
        raise AudioError(name, f"is silent: all {array.size} samples are zero or below one 16-bit step")
    if problem := _duration_problem(array.size / sampling_rate, min_seconds, max_seconds):
        raise AudioError(name, problem)
    if target_sampling_rate is not None:
        return resample_audio(array, sampling_rate, target_sampling_rate)
    return np.ascontiguousarray(array, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Decoders


class _DecodeError(Exception):
    """A decoder's one-line reason, turned into an `AudioError` by the caller that knows the input's name."""


def _soundfile_reason(error: Exception) -> str:
    # LibsndfileError carries the bare reason; its str() prefixes "Error opening '<path>': ".
    reason = getattr(error, "error_string", None) or str(error)
    return reason.strip().rstrip(".")


def _ffmpeg_reason(stderr: bytes, input_arg: str) -> str:
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return "ffmpeg failed without a message"
    reason = lines[-1]
    for prefix in (f"{input_arg}: ", "pipe:0: "):
        reason = reason.removeprefix(prefix)
    return reason[:300]


def _wav_truncation(head: bytes, total_size: int) -> tuple[int, int] | None:
    """(declared, present) data bytes when a RIFF/WAVE file ends before its `data` chunk does, else None.

    libsndfile quietly reads what is there; a half-copied file would then pair with a full-length transcript.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    position = 12
    while position + 8 <= len(head):
        chunk_id, size = head[position : position + 4], int.from_bytes(head[position + 4 : position + 8], "little")
        if chunk_id == b"data":
            if size in (0, 0xFFFFFFFF):  # streaming writers leave the size unset
                return None
            present = total_size - (position + 8)
            return (size, present) if present < size else None
        position += 8 + size + (size & 1)
    return None


def _check_wav_truncation(source: Path | bytes, name: str) -> None:
    if isinstance(source, Path):
        with open(source, "rb") as handle:
            head = handle.read(65536)
        total = source.stat().st_size
    else:
        head, total = source[:65536], len(source)
    if truncation := _wav_truncation(head, total):
        declared, present = truncation
        raise AudioError(
            name, f"truncated WAV: the header declares {declared} bytes of audio data but only {present} are present"
        )


def _decode_soundfile(source: Path | bytes, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Mono float32 at the file's own rate; raises `_DecodeError` for anything libsndfile rejects."""
    try:
        with sf.SoundFile(source if isinstance(source, Path) else io.BytesIO(source)) as handle:
            sampling_rate = handle.samplerate
            if handle.format in ("WAV", "WAVEX"):
                _check_wav_truncation(source, name)
            if max_seconds is not None and handle.frames > 0 and handle.frames / sampling_rate > max_seconds:
                # Refuse before decoding: an hours-long upload should not cost its decode time to be rejected.
                raise AudioError(name, _duration_problem(handle.frames / sampling_rate, None, max_seconds) or "")
            data = handle.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as error:
        raise _DecodeError(_soundfile_reason(error)) from None
    return (data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)), sampling_rate


def _ffmpeg_command(ffmpeg: str, input_arg: str, sampling_rate: int, max_seconds: float | None = None) -> list[str]:
    command = [ffmpeg, "-hide_banner", "-loglevel", "error"]
    if input_arg != "pipe:0":
        command.append("-nostdin")
    command += ["-i", input_arg, "-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(sampling_rate)]
    if max_seconds is not None:
        command += ["-t", f"{max_seconds + 1.0:.3f}"]  # enough to tell "too long" without decoding all of it
    return command + ["-f", "f32le", "-acodec", "pcm_f32le", "pipe:1"]


def _decode_ffmpeg(
    source: Path | bytes, sampling_rate: int, suffix: str, max_seconds: float | None
) -> tuple[np.ndarray, int]:
    """Mono float32 at `sampling_rate` (ffmpeg downmixes and resamples); raises `_DecodeError` when ffmpeg fails."""
    ffmpeg = _ffmpeg()
    assert ffmpeg is not None
    temporary = None
    try:
        if isinstance(source, Path):
            input_arg, stdin = str(source), None
        elif source[4:8] == b"ftyp":
            # MP4/M4A/MOV often keep their index (moov) after the audio, which ffmpeg cannot reach through a pipe.
            with tempfile.NamedTemporaryFile(suffix=suffix or ".m4a", delete=False) as handle:
                handle.write(source)
            temporary = handle.name
            input_arg, stdin = temporary, None
        else:
            input_arg, stdin = "pipe:0", bytes(source)
        command = _ffmpeg_command(ffmpeg, input_arg, sampling_rate, max_seconds)
        result = subprocess.run(command, input=stdin, capture_output=True, check=False)
    finally:
        if temporary is not None:
            os.unlink(temporary)
    if result.returncode != 0:
        raise _DecodeError(_ffmpeg_reason(result.stderr, input_arg))
    usable = len(result.stdout) - len(result.stdout) % 4
    return np.frombuffer(result.stdout[:usable], dtype="<f4").astype(np.float32), sampling_rate


def _resolve(source: AudioSource, name: str | None) -> tuple[Path | bytes, str, str]:
    """(path or bytes, display name, lower-case extension) for any accepted source; checks the file exists."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        display = name or str(source)
        if not path.exists():
            raise AudioError(display, "file not found")
        if path.is_dir():
            raise AudioError(display, "is a directory, not an audio file")
        if path.stat().st_size == 0:
            raise AudioError(display, "file is empty (0 bytes)")
        return path, display, (path.suffix or Path(name or "").suffix).lower()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, display = bytes(source), name or "<bytes>"
    elif hasattr(source, "read"):
        data = source.read()
        display = name or str(getattr(source, "name", None) or "<stream>")
        if not isinstance(data, bytes):
            raise TypeError(f"{display}: file-like audio must be opened in binary mode")
    else:
        raise TypeError(f"audio source must be a path, bytes or a binary file object, got {type(source).__name__}")
    if not data:
        raise AudioError(display, "file is empty (0 bytes)")
    return data, display, Path(display).suffix.lower()


def load_audio(
    source: AudioSource,
    sampling_rate: int = 16000,
    *,
    name: str | None = None,
    min_seconds: float | None = None,
    max_seconds: float | None = None,
    reject_silence: bool = False,
) -> np.ndarray:
    """Decode `source` (a path, bytes, or a binary file object) to mono float32 at `sampling_rate`.

    `name` labels the input in error messages (e.g. an upload's original filename) and, for bytes, gives the
    extension that picks the decoder. Channels are averaged; resampling uses soxr's high-quality filter (ffmpeg's
    resampler for formats ffmpeg decodes). The checks are `validate_audio`'s; `max_seconds` is enforced before a
    long file is decoded in full.
    """
    if sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be positive, got {sampling_rate}")
    data, display, suffix = _resolve(source, name)
    ffmpeg_available = _ffmpeg() is not None
    soundfile_reason = None
    if not (suffix in _FFMPEG_FIRST and ffmpeg_available):
        try:
            array, native_rate = _decode_soundfile(data, display, max_seconds)
            return validate_audio(
                array,
                native_rate,
                name=display,
                min_seconds=min_seconds,
                max_seconds=max_seconds,
                reject_silence=reject_silence,
                target_sampling_rate=sampling_rate,
            )
        except _DecodeError as error:
            soundfile_reason = str(error)
    if not ffmpeg_available:
        raise AudioError(
            display,
            f"not a readable audio file (soundfile: {soundfile_reason}); if it is mp3/m4a/webm or another compressed "
            "format, install ffmpeg to decode it",
        )
    try:
        array, _ = _decode_ffmpeg(data, sampling_rate, suffix, max_seconds)
    except _DecodeError as error:
        reasons = ([f"soundfile: {soundfile_reason}"] if soundfile_reason else []) + [f"ffmpeg: {error}"]
        raise AudioError(display, f"not a readable audio file or corrupt ({'; '.join(reasons)})") from None
    if max_seconds is not None and array.size / sampling_rate > max_seconds + 0.999:
        # ffmpeg stopped at max_seconds + 1 s, so only a lower bound on the length is known.
        raise AudioError(display, f"audio is longer than max_seconds={max_seconds:g} (decoding stopped there)")
    return validate_audio(
        array,
        sampling_rate,
        name=display,
        min_seconds=min_seconds,
        max_seconds=max_seconds,
        reject_silence=reject_silence,
    )


# --------------------------------------------------------------------------------------------------------------------
# Streaming and metadata


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


def audio_duration(path: str | os.PathLike, *, name: str | None = None) -> float:
    """Duration in seconds from the file header (soundfile) or ffprobe, without decoding the audio.

    Container-reported durations of compressed formats can be off by a few milliseconds (encoder padding).
    """
    source, display, suffix = _resolve(path, name)
    ffprobe = _ffprobe()
    soundfile_reason = None
    if not (suffix in _FFMPEG_FIRST and ffprobe):
        try:
            info = sf.info(str(source))
            return info.frames / info.samplerate
        except (sf.SoundFileError, RuntimeError) as error:
            soundfile_reason = _soundfile_reason(error)
    if not ffprobe:
        raise AudioError(display, f"not a readable audio file (soundfile: {soundfile_reason}); install ffmpeg")
    command = [ffprobe, "-v", "error", "-show_entries", "format=duration", "-of", "default=nw=1:nk=1", str(source)]
    result = subprocess.run(command, capture_output=True, check=False)
    text = result.stdout.decode().strip()
    try:
        duration = float(text)
    except ValueError:
        reason = _ffmpeg_reason(result.stderr, str(source)) if result.returncode else f"no duration ({text or 'N/A'})"
        raise AudioError(display, f"not a readable audio file or corrupt (ffprobe: {reason})") from None
    if not math.isfinite(duration) or duration < 0:
        raise AudioError(display, f"ffprobe reports an invalid duration ({text})")
    return duration

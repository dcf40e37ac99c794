"""Audio I/O shared by training data, the transcription CLI and the HTTP server.

Everything returns mono float32 at one sampling rate, and every bad input raises `AudioError` with a message that names
the input and the problem, so that a data pipeline can log and skip a file and a server can answer 400 with a useful
text instead of a stack trace.

wav/flac/ogg are decoded by soundfile (libsndfile, in-process, fast). mp3/m4a/webm and anything libsndfile cannot read
go through an `ffmpeg` subprocess; ffmpeg is optional, and only the formats that need it fail without it.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from .audio_decoders import (
    _FFMPEG_FIRST,
    AudioError,
    AudioSource,
    _decode_ffmpeg,
    _decode_soundfile,
    _DecodeError,
    _duration_problem,
    _ffmpeg,
    _ffmpeg_reason,
    _ffprobe,
    _finite_problem,
    _resolve,
    _soundfile_reason,
)
from .audio_stream import iter_audio_blocks

logger = logging.getLogger(__name__)

__all__ = [
    "AudioError",
    "audio_duration",
    "iter_audio_blocks",
    "load_audio",
    "resample_audio",
    "validate_audio",
]

# Peak amplitude below one 16-bit quantisation step: what "digital silence" looks like after any decoder.
_SILENCE_PEAK = 1.0 / 32768
# Full scale of the integer PCM dtypes, so int16 arrays from scipy/wave are scaled like soundfile would.
_PCM_SCALE = {np.dtype(np.int8): 2.0**7, np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}
# A 2-D array whose smaller dimension is at most this many is (channels, samples) or (samples, channels).
_MAX_CHANNELS = 8


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

"""The file decoders under `speechlm.audio`: soundfile (libsndfile, in-process) and an `ffmpeg` subprocess, the checks
both share (missing/empty files, truncated WAVs, NaN samples, durations) and `AudioError`, the one error they raise.

Shared by whole-file loading (`speechlm.audio.load_audio`) and streaming (`speechlm.audio_stream`); import the public
names from `speechlm.audio`.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

# Extensions decoded by ffmpeg first even though recent libsndfile reads some of them (mp3): ffmpeg handles encoder
# delay/padding and exotic variants consistently, and libsndfile's mp3 support depends on how it was built.
_FFMPEG_FIRST = {
    ".3gp", ".aac", ".amr", ".avi", ".m4a", ".m4b", ".mkv", ".mov", ".mp2", ".mp3", ".mp4", ".mpeg", ".mpga", ".oga",
    ".opus", ".wma", ".weba", ".webm",
}  # fmt: skip


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

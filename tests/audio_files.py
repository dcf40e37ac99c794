"""Audio files for the audio tests, written once per module: good audio in several formats/rates, and each kind of
broken input (`files`), plus the helpers that make and measure them."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

HAS_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None
needs_ffmpeg = pytest.mark.skipif(not HAS_FFMPEG, reason="ffmpeg/ffprobe not installed (decoder for mp3/m4a/webm)")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (speech TTS)")


def tone(seconds: float, sampling_rate: int, frequency: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sampling_rate)) / sampling_rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def dominant_frequency(signal: np.ndarray, sampling_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(signal.size)))
    return float(np.argmax(spectrum) * sampling_rate / signal.size)


def ffmpeg_encode(source, target, *args: str) -> None:
    command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source), *args, str(target)]
    subprocess.run(command, check=True, capture_output=True)


@pytest.fixture(scope="module", name="files")
def files_fixture(tmp_path_factory):
    """Every test file, written once: good audio in several formats/rates, and each kind of broken input."""
    root = tmp_path_factory.mktemp("audio")
    paths = {}

    def write(name, data, sampling_rate, **kwargs):
        paths[name] = root / name
        sf.write(paths[name], data, sampling_rate, **kwargs)

    write("mono16k.wav", tone(1.0, 16000), 16000, subtype="FLOAT")
    write("mono8k.wav", tone(1.5, 8000), 8000)
    write("mono44k.wav", tone(1.25, 44100), 44100)
    stereo = np.stack([tone(1.0, 16000, 440), tone(1.0, 16000, 660, 0.25)], axis=1)
    write("stereo16k.wav", stereo, 16000, subtype="FLOAT")
    write("stereo44k.flac", np.stack([tone(0.75, 44100, 440), tone(0.75, 44100, 880, 0.2)], axis=1), 44100)
    write("mono22k.ogg", tone(1.0, 22050, 330), 22050, format="OGG", subtype="VORBIS")
    long_stereo = np.stack([tone(5.0, 44100, 440), tone(5.0, 44100, 523, 0.3)], axis=1)
    write("long44k.wav", long_stereo, 44100)
    write("silent.wav", np.zeros(16000, np.float32), 16000)
    write("empty.wav", np.zeros(0, np.float32), 16000)
    with_nan = tone(1.0, 16000)
    with_nan[8000] = np.nan
    write("nan.wav", with_nan, 16000, subtype="FLOAT")

    paths["not_audio.wav"] = root / "not_audio.wav"
    paths["not_audio.wav"].write_text("this is a text file, not a RIFF header\n" * 20)
    paths["zero_bytes.wav"] = root / "zero_bytes.wav"
    paths["zero_bytes.wav"].write_bytes(b"")
    wav_bytes = paths["mono8k.wav"].read_bytes()
    paths["truncated_header.wav"] = root / "truncated_header.wav"
    paths["truncated_header.wav"].write_bytes(wav_bytes[:30])
    paths["truncated_data.wav"] = root / "truncated_data.wav"
    paths["truncated_data.wav"].write_bytes(wav_bytes[: len(wav_bytes) // 2])
    paths["folder.wav"] = root / "folder.wav"
    paths["folder.wav"].mkdir()
    paths["missing.wav"] = root / "missing.wav"

    if HAS_FFMPEG:
        for name, args in [("tone.mp3", ["-codec:a", "libmp3lame", "-b:a", "64k"]), ("tone.m4a", ["-c:a", "aac"])]:
            paths[name] = root / name
            ffmpeg_encode(paths["mono44k.wav"], paths[name], *args)
        paths["long.mp3"] = root / "long.mp3"
        ffmpeg_encode(paths["long44k.wav"], paths["long.mp3"], "-codec:a", "libmp3lame", "-b:a", "64k")
    if shutil.which("espeak-ng"):
        paths["speech.wav"] = root / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(paths["speech.wav"]), "hello world, this is a test"], check=True)
    return paths

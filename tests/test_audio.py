"""Audio loading, validation, streaming and duration, on files generated in a temporary folder."""

from __future__ import annotations

import io
import pickle
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from speechlm import audio
from speechlm.audio import AudioError, audio_duration, iter_audio_blocks, load_audio, resample_audio, validate_audio

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


@pytest.fixture(scope="module")
def files(tmp_path_factory):
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


# ---------------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize(("name", "seconds"), [("mono16k.wav", 1.0), ("mono8k.wav", 1.5), ("mono44k.wav", 1.25)])
def test_resampled_length_and_pitch(files, name, seconds):
    array = load_audio(files[name])
    assert array.dtype == np.float32 and array.ndim == 1
    assert abs(array.size - seconds * 16000) <= 1
    assert abs(dominant_frequency(array, 16000) - 440) < 2  # resampling kept the tone where it was


def test_other_target_rate(files):
    array = load_audio(files["mono44k.wav"], sampling_rate=24000)
    assert abs(array.size - 1.25 * 24000) <= 1


def test_stereo_downmix_is_channel_mean(files):
    stereo, _ = sf.read(files["stereo16k.wav"], dtype="float32")
    np.testing.assert_allclose(load_audio(files["stereo16k.wav"]), stereo.mean(axis=1), atol=1e-7)


def test_flac_stereo_is_downmixed_then_resampled(files):
    stereo, rate = sf.read(files["stereo44k.flac"], dtype="float32")
    expected = resample_audio(stereo.mean(axis=1), rate, 16000)
    np.testing.assert_allclose(load_audio(files["stereo44k.flac"]), expected, atol=1e-6)
    assert abs(expected.size - 0.75 * 16000) <= 1


def test_ogg(files):
    array = load_audio(files["mono22k.ogg"])
    assert abs(array.size - 16000) <= 1
    assert abs(dominant_frequency(array, 16000) - 330) < 2


@needs_espeak
def test_espeak_speech(files):
    info = sf.info(files["speech.wav"])
    array = load_audio(files["speech.wav"])
    assert abs(array.size - info.frames * 16000 / info.samplerate) <= 1
    assert np.abs(array).max() > 0.05


def test_bytes_and_file_objects_match_path(files):
    expected = load_audio(files["mono44k.wav"])
    data = files["mono44k.wav"].read_bytes()
    np.testing.assert_array_equal(load_audio(data), expected)
    np.testing.assert_array_equal(load_audio(io.BytesIO(data)), expected)
    with open(files["mono44k.wav"], "rb") as handle:
        np.testing.assert_array_equal(load_audio(handle), expected)


def test_silence_is_valid_unless_rejected(files):
    array = load_audio(files["silent.wav"])
    assert array.size == 16000 and not array.any()
    with pytest.raises(AudioError, match=r"silent\.wav: is silent"):
        load_audio(files["silent.wav"], reject_silence=True)


def test_duration_limits(files):
    with pytest.raises(AudioError, match=r"mono8k\.wav: audio is 1\.500 s long, shorter than min_seconds=2"):
        load_audio(files["mono8k.wav"], min_seconds=2)
    with pytest.raises(AudioError, match=r"mono8k\.wav: audio is 1\.500 s long, longer than max_seconds=1"):
        load_audio(files["mono8k.wav"], max_seconds=1)
    assert load_audio(files["mono8k.wav"], min_seconds=1, max_seconds=2).size == 24000


def test_max_seconds_is_checked_before_decoding(files, monkeypatch):
    monkeypatch.setattr(audio.sf.SoundFile, "read", lambda *args, **kwargs: pytest.fail("decoded a too-long file"))
    with pytest.raises(AudioError, match=r"long44k\.wav: audio is 5\.000 s long, longer than max_seconds=2"):
        load_audio(files["long44k.wav"], max_seconds=2)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("missing.wav", "file not found"),
        ("folder.wav", "is a directory"),
        ("zero_bytes.wav", "file is empty (0 bytes)"),
        ("not_audio.wav", "not a readable audio file"),
        ("truncated_header.wav", "not a readable audio file"),
        ("truncated_data.wav", "truncated WAV: the header declares 24000 bytes of audio data but only"),
        ("empty.wav", "contains no audio samples"),
        ("nan.wav", "contains 1 NaN sample(s), the first at 0.500 s"),
    ],
)
def test_bad_files_raise_audio_error_naming_file_and_problem(files, name, problem):
    with pytest.raises(AudioError) as info:
        load_audio(files[name])
    message = str(info.value)
    assert name in message and problem in message, message
    assert isinstance(info.value, ValueError)


def test_decoder_reason_is_reported(files):
    with pytest.raises(AudioError, match=r"soundfile: Format not recognised"):
        load_audio(files["not_audio.wav"])


def test_caller_name_labels_uploads(files):
    with pytest.raises(AudioError, match=r"^upload\.wav: .*not a readable audio file"):
        load_audio(files["not_audio.wav"].read_bytes(), name="upload.wav")
    with pytest.raises(AudioError, match=r"^<bytes>: file is empty"):
        load_audio(b"")


def test_audio_error_pickles():
    error = pickle.loads(pickle.dumps(AudioError("clip.wav", "file not found")))
    assert (error.name, error.problem, str(error)) == ("clip.wav", "file not found", "clip.wav: file not found")


# ----------------------------------------------------------------------------------------------------------- ffmpeg


@needs_ffmpeg
def test_mp3_goes_through_ffmpeg(files, monkeypatch):
    calls = []
    original = audio._decode_ffmpeg
    monkeypatch.setattr(audio, "_decode_ffmpeg", lambda *args: calls.append(args) or original(*args))
    monkeypatch.setattr(audio, "_decode_soundfile", lambda *args: pytest.fail("mp3 should not go to soundfile"))
    array = load_audio(files["tone.mp3"])
    assert len(calls) == 1
    assert abs(array.size - 1.25 * 16000) < 0.03 * 16000  # gapless info trims the encoder's padding
    assert abs(dominant_frequency(array, 16000) - 440) < 2


@needs_ffmpeg
def test_m4a_bytes_with_upload_name(files):
    array = load_audio(files["tone.m4a"].read_bytes(), name="voice memo.m4a")
    assert abs(array.size - 1.25 * 16000) < 0.05 * 16000


@needs_ffmpeg
def test_unknown_extension_falls_back_to_ffmpeg_after_soundfile(files, tmp_path):
    renamed = tmp_path / "recording.bin"  # no extension hint: soundfile is tried first and fails on AAC
    renamed.write_bytes(files["tone.m4a"].read_bytes())
    array = load_audio(renamed)
    assert abs(array.size - 1.25 * 16000) < 0.05 * 16000


@needs_ffmpeg
def test_ffmpeg_max_seconds_stops_early(files):
    with pytest.raises(AudioError, match=r"long\.mp3: audio is longer than max_seconds=2"):
        load_audio(files["long.mp3"], max_seconds=2)


def test_without_ffmpeg_the_error_says_to_install_it(files, monkeypatch):
    monkeypatch.setattr(audio, "_ffmpeg", lambda: None)
    with pytest.raises(AudioError, match=r"not_audio\.wav: not a readable audio file .*install ffmpeg"):
        load_audio(files["not_audio.wav"])


@needs_ffmpeg
@pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile cannot read mp3")
def test_without_ffmpeg_mp3_falls_back_to_libsndfile(files, monkeypatch):
    monkeypatch.setattr(audio, "_ffmpeg", lambda: None)
    assert abs(load_audio(files["tone.mp3"]).size - 1.25 * 16000) < 0.03 * 16000


# -------------------------------------------------------------------------------------------------------- validation


def test_validate_accepts_lists_and_both_channel_layouts():
    left, right = tone(0.1, 16000), tone(0.1, 16000, 660)
    expected = (left + right) / 2
    np.testing.assert_allclose(validate_audio(np.stack([left, right]), 16000), expected, atol=1e-7)
    np.testing.assert_allclose(validate_audio(np.stack([left, right], axis=1), 16000), expected, atol=1e-7)
    np.testing.assert_allclose(validate_audio(left.tolist(), 16000), left, atol=1e-7)
    assert validate_audio(left[None, :], 16000).shape == left.shape


def test_validate_torch_tensors():
    torch = pytest.importorskip("torch")
    clip = tone(0.1, 16000)
    np.testing.assert_allclose(validate_audio(torch.from_numpy(clip).to(torch.bfloat16), 16000), clip, atol=1e-2)
    pcm = torch.from_numpy((clip * 32767).astype(np.int16))
    np.testing.assert_allclose(validate_audio(pcm, 16000), clip, atol=1e-4)


def test_validate_scales_pcm_and_resamples():
    clip = tone(0.5, 8000)
    np.testing.assert_allclose(validate_audio((clip * 32767).astype(np.int16), 8000), clip, atol=1e-4)
    assert validate_audio(clip, 8000, target_sampling_rate=16000).size == 8000


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((3, 2, 100), np.float32), "expected a 1-D or 2-D audio array, got shape (3, 2, 100)"),
        (np.zeros((100, 100), np.float32), "ambiguous audio shape (100, 100)"),
        (np.zeros(0, np.float32), "contains no audio samples"),
        (np.array([0.0, np.inf, np.nan, 0.0]), "contains 1 NaN and 1 infinite sample(s), the first at 0.000 s"),
        (np.array([0, 1000, -1000]), "integer samples of dtype int64 have no standard full scale"),
        (np.array([1j, 2j]), "samples must be real numbers"),
    ],
)
def test_validate_rejects(array, problem):
    with pytest.raises(AudioError) as info:
        validate_audio(array, 16000, name="clip-7")
    assert str(info.value).startswith("clip-7: ") and problem in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------------------- streaming


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


# ---------------------------------------------------------------------------------------------------------- duration


def test_audio_duration(files):
    assert audio_duration(files["mono44k.wav"]) == pytest.approx(1.25)
    assert audio_duration(files["stereo44k.flac"]) == pytest.approx(0.75)
    with pytest.raises(AudioError, match=r"missing\.wav: file not found"):
        audio_duration(files["missing.wav"])


@needs_ffmpeg
def test_audio_duration_ffprobe(files):
    assert audio_duration(files["tone.mp3"]) == pytest.approx(1.25, abs=0.06)
    with pytest.raises(AudioError, match=r"not_audio\.wav: not a readable audio file"):
        audio_duration(files["not_audio.wav"])

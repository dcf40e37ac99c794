"""Audio loading, validation and duration (speechlm/audio.py; the decoders' own claims are in
test_audio_decoders.py), on files generated in a temporary folder."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from speechlm import audio
from speechlm.audio import AudioError, audio_duration, load_audio, resample_audio, validate_audio
from tests.audio_files import dominant_frequency, files_fixture, needs_espeak, needs_ffmpeg, tone  # noqa: F401 (the `files` fixture)

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

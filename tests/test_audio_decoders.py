"""The file decoders under `speechlm.audio` (speechlm/audio_decoders.py): how a source is named in errors, the
soundfile decoder's checks and reasons, and `AudioError`; exercised through `load_audio`, on files generated in a
temporary folder."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import soundfile as sf

from speechlm import audio_decoders
from speechlm.audio import AudioError, load_audio
from tests.audio_files import files_fixture, tone  # noqa: F401 (the `files` fixture)


def test_max_seconds_is_checked_before_decoding(files, monkeypatch):
    monkeypatch.setattr(audio_decoders.sf.SoundFile, "read",
                        lambda *args, **kwargs: pytest.fail("decoded a too-long file"))
    with pytest.raises(AudioError, match=r"long44k\.wav: audio is 5\.000 s long, longer than max_seconds=2"):
        load_audio(files["long44k.wav"], max_seconds=2)


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


def test_a_wav_whose_writer_left_the_data_size_unset_is_read_in_full():
    """Streaming writers (a live recording, ffmpeg to a pipe) leave the data chunk's size at 0xFFFFFFFF: that is not a
    truncated file, and all of its samples are read."""
    clip = tone(0.5, 16000)
    buffer = io.BytesIO()
    sf.write(buffer, clip, 16000, format="WAV", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    size_at = data.index(b"data") + 4
    data[size_at : size_at + 4] = (0xFFFFFFFF).to_bytes(4, "little")
    np.testing.assert_allclose(load_audio(bytes(data), name="live.wav"), clip, atol=1e-4)

"""Long-audio segmentation and streaming, output formats, and the `speechlm transcribe` command."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

import speechlm.audio
import speechlm.inference as inference
from speechlm.audio import iter_audio_blocks, load_audio
from speechlm.cli import main
from speechlm.inference import (
    Segment,
    SilenceSplitter,
    format_timestamp,
    load_pretrained,
    segments_to_srt,
    segments_to_vtt,
    split_on_silence,
    transcribe_arrays,
    transcribe_long,
)
from tests.conftest import make_clips
from tests.tiny_models import CORPUS

SR = 16000
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (speech TTS)")


def espeak_recording(folder, seconds: float = 120.0, seed: int = 0):
    """espeak-ng sentences separated by 0.8-2 s of silence, about `seconds` long -> (wav path, speech intervals)."""
    rng = np.random.default_rng(seed)
    pieces, intervals, position, index = [], [], 0.0, 0
    while position < seconds:
        sentence = folder / f"sentence-{index % len(CORPUS)}.wav"
        if not sentence.exists():
            subprocess.run(["espeak-ng", "-w", str(sentence), CORPUS[index % len(CORPUS)]], check=True)
        speech = load_audio(sentence, SR)
        gap = np.zeros(int(rng.uniform(0.8, 2.0) * SR), dtype=np.float32)
        position += len(gap) / SR
        intervals.append((position, position + len(speech) / SR))
        position += len(speech) / SR
        pieces += [gap, speech]
        index += 1
    pieces.append(np.zeros(SR, dtype=np.float32))
    path = folder / "long.wav"
    sf.write(path, np.concatenate(pieces), SR, subtype="PCM_16")
    return path, intervals


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (speech TTS)")
    return espeak_recording(tmp_path_factory.mktemp("long"))


@pytest.fixture(scope="module")
def whisper_qwen(build):
    return build("whisper", "qwen2")


def covering(chunks, start, end):
    return [c for c in chunks if c.start <= start + 0.05 and c.end >= end - 0.25]


# ------------------------------------------------------------------------------------------------ segmentation
@needs_espeak
def test_split_on_silence_finds_every_sentence(recording):
    path, intervals = recording
    chunks = list(split_on_silence(iter_audio_blocks(path, 4.0, SR), SR, max_chunk_seconds=25))
    assert len(chunks) == len(intervals)
    for chunk, (start, end) in zip(chunks, intervals):
        assert covering([chunk], start, end), (chunk.start, chunk.end, start, end)
        assert chunk.end - chunk.start <= 25
        assert math.isclose(len(chunk.audio) / SR, chunk.end - chunk.start)
    starts = [chunk.start for chunk in chunks]
    assert starts == sorted(starts)
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:]))


@needs_espeak
def test_speech_longer_than_max_is_cut_below_max(recording):
    path, intervals = recording
    # Silences never end a chunk here (min 5 s), so only the max-length cut splits the speech.
    splitter = SilenceSplitter(SR, max_chunk_seconds=3.0, min_silence_seconds=5.0)
    chunks = []
    for block in iter_audio_blocks(path, 1.0, SR):
        chunks += splitter.push(block)
    chunks += splitter.flush()
    assert max(chunk.end - chunk.start for chunk in chunks) <= 3.0
    assert all(a.end <= b.start + 1e-9 for a, b in zip(chunks, chunks[1:]))
    # Nothing of the speech is lost: every sentence's samples lie in the chunks.
    for start, end in intervals:
        inside = sum(max(0.0, min(c.end, end - 0.25) - max(c.start, start)) for c in chunks)
        assert inside >= (end - 0.25 - start) - 1e-6


def test_silence_and_noise_give_no_chunks():
    quiet = np.zeros(5 * SR, dtype=np.float32)
    assert list(split_on_silence([quiet], SR)) == []
    with pytest.raises(ValueError, match="8 or 16 kHz"):
        SilenceSplitter(22050)


@needs_espeak
def test_splitter_memory_is_bounded(recording):
    path, _ = recording
    splitter = SilenceSplitter(SR, max_chunk_seconds=10.0)
    total = 0
    for block in iter_audio_blocks(path, 2.0, SR):
        total += len(block)
        splitter.push(block)
    splitter.flush()
    assert total > 110 * SR
    assert splitter.peak_buffered_samples <= (10.0 + 2.0 + 0.5) * SR


# ------------------------------------------------------------------------------------------------ transcribe_long
@needs_espeak
def test_transcribe_long_streams_and_batches(recording, whisper_qwen, monkeypatch):
    processor, model = whisper_qwen
    path, intervals = recording
    read = {"blocks": 0}
    real_blocks, real_transcribe = speechlm.audio.iter_audio_blocks, inference.transcribe_arrays

    def counting_blocks(*args, **kwargs):
        for block in real_blocks(*args, **kwargs):
            read["blocks"] += 1
            yield block

    calls = []

    def spy(model, processor, audios, *args, **kwargs):
        calls.append((len(audios), read["blocks"]))
        return real_transcribe(model, processor, audios, *args, **kwargs)

    monkeypatch.setattr(speechlm.audio, "iter_audio_blocks", counting_blocks)
    monkeypatch.setattr(inference, "transcribe_arrays", spy)
    segments = transcribe_long(model, processor, path, batch_size=10, max_new_tokens=2)
    total_blocks = read["blocks"]

    assert len(segments) == len(intervals)
    sizes = [size for size, _ in calls]
    assert sizes[:-1] == [10] * (len(sizes) - 1) and 0 < sizes[-1] <= 10 and sum(sizes) == len(intervals)
    # Decoding starts long before the file has been read: the first batch needs only its first ~10 sentences.
    assert calls[0][1] < total_blocks / 2
    for segment, (start, end) in zip(segments, intervals):
        assert isinstance(segment, Segment) and isinstance(segment.text, str)
        assert segment.start <= start + 0.05 and segment.end >= end - 0.25
    # Same text as decoding every chunk alone.
    chunks = list(split_on_silence(real_blocks(path, 4.0, SR), SR))
    alone = [real_transcribe(model, processor, [c.audio], max_new_tokens=2)[0] for c in chunks[:3]]
    assert [segment.text for segment in segments[:3]] == alone


def test_transcribe_long_reports_bad_files(whisper_qwen, tmp_path):
    processor, model = whisper_qwen
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(speechlm.audio.AudioError, match="broken.wav"):
        transcribe_long(model, processor, bad)


# ------------------------------------------------------------------------------------------------ formats
def test_timestamps_and_subtitles():
    assert format_timestamp(0) == "00:00:00.000"
    assert format_timestamp(3661.5) == "01:01:01.500"
    assert format_timestamp(59.9996, ",") == "00:01:00,000"
    segments = [Segment(0.0, 1.25, "hello there"), Segment(1.5, 2.0, ""), Segment(2.5, 4.0, "general")]
    assert segments_to_srt(segments) == (
        "1\n00:00:00,000 --> 00:00:01,250\nhello there\n\n2\n00:00:02,500 --> 00:00:04,000\ngeneral\n\n"
    )
    assert segments_to_vtt(segments) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nhello there\n\n00:00:02.500 --> 00:00:04.000\ngeneral\n\n"
    )


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def saved_model(whisper_qwen, tmp_path_factory):
    processor, model = whisper_qwen
    folder = tmp_path_factory.mktemp("trained")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_wav(path, audio):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, SR, subtype="FLOAT" if path.suffix == ".wav" else "PCM_16")
    return path


def test_cli_folders_manifests_and_failures(saved_model, tmp_path, capsys):
    clips = make_clips((0.5, 0.9, 0.3))
    data = tmp_path / "data"
    write_wav(data / "a.wav", clips[0])
    write_wav(data / "sub" / "b.wav", clips[1])
    (data / "sub" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    write_wav(data / "click.wav", np.full(5, 0.1, dtype=np.float32))
    (data / "notes.txt").write_text("not audio, not picked up")
    write_wav(tmp_path / "extra" / "c.flac", clips[2])
    manifest = tmp_path / "extra" / "list.jsonl"
    manifest.write_text(
        json.dumps({"audio": "c.flac", "id": "utt-c", "text": "reference"}) + "\n"
        + "{not json\n" + json.dumps({"audio": "missing.wav"}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out"
    code = main([
        "transcribe", str(data), str(manifest), "--model", str(saved_model), "--format", "json",
        "--output", str(out), "--max-new-tokens", "4", "--batch-size", "2", "--quiet",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.wav" in err and "missing.wav" in err and "list.jsonl:2" in err
    assert "click.wav: audio is 0.000 s long, shorter than min_seconds=0.1" in err
    assert "transcribed 3 file(s), 4 failed" in err

    processor, model = load_pretrained(str(saved_model))
    audios = [load_audio(path, SR) for path in (data / "a.wav", data / "sub" / "b.wav", tmp_path / "extra" / "c.flac")]
    expected = transcribe_arrays(model, processor, audios, max_new_tokens=4)
    written = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("*.json")}
    assert sorted(written) == ["a.json", "sub/b.json", "utt-c.json"]
    assert [written[name]["text"] for name in ("a.json", "sub/b.json", "utt-c.json")] == expected
    assert written["utt-c.json"]["id"] == "utt-c"
    assert written["a.json"]["segments"] == [{"start": 0.0, "end": 0.5, "text": expected[0]}]


def test_cli_stdout_keeps_input_order(saved_model, tmp_path, capsys):
    clips = make_clips((0.9, 0.4))
    first, second = write_wav(tmp_path / "first.wav", clips[0]), write_wav(tmp_path / "second.wav", clips[1])
    code = main(["transcribe", str(first), str(second), "--model", str(saved_model), "--max-new-tokens", "4",
                 "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    processor, model = load_pretrained(str(saved_model))
    texts = transcribe_arrays(model, processor, clips, max_new_tokens=4)
    assert out == f"==> {first} <==\n{texts[0]}\n==> {second} <==\n{texts[1]}\n"


@needs_espeak
def test_cli_long_file_to_subtitles(saved_model, recording, capsys):
    path, intervals = recording
    code = main(["transcribe", str(path), "--model", str(saved_model), "--format", "vtt", "--max-new-tokens", "3",
                 "--batch-size", "16", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("WEBVTT\n\n")
    cues = [line for line in out.splitlines() if "-->" in line]
    assert 0 < len(cues) <= len(intervals)
    assert cues[0].startswith("00:00:0")


def test_bad_manifest_ids_and_non_utf8_lines_are_reported_and_the_rest_go_on(tmp_path):
    from speechlm.inference import collect_inputs

    for name in ("a", "b"):
        sf.write(tmp_path / f"{name}.wav", np.zeros(1600, dtype=np.float32), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"audio": "a.wav", "id": "' + b"x" * 300 + b'"}\n'
                         b'{"audio": "a.wav", "id": "nul\\u0000id"}\n'
                         b'{"audio": "a.wav", "id": "caf\xe9"}\n'
                         b'{"audio": "b.wav", "id": "fine"}\n')
    inputs, errors = collect_inputs([str(manifest)])
    assert [item.id for item in inputs] == ["fine"]
    assert [error.split(": ")[0] for error in errors] == [f"{manifest}:{n}" for n in (1, 2, 3)]
    assert "at most 200 bytes" in errors[0] and "not UTF-8" in errors[2]

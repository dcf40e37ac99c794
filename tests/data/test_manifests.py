"""Manifests: JSONL files (errors with file:line, skip/raise, duration filters) and Hugging Face datasets."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from speechlm.data.dataset import SpeechLMDataset
from speechlm.data.manifests import ManifestError, read_manifest, read_text_examples, records_from_dataset
from tests.conftest import make_clips


def test_manifest_resolves_relative_paths_and_probes_durations(corpus, tmp_path, monkeypatch):
    root, manifest, _ = corpus
    monkeypatch.chdir(tmp_path.parent)  # relative to the manifest, never to the working directory
    records = read_manifest(manifest)
    assert len(records) == 3 and not records.skipped
    assert records[0]["audio"] == str(root.resolve() / "clips" / "0.wav")
    assert records[1]["duration"] == pytest.approx(0.3, abs=1e-3)  # read from the 22.05 kHz file's header
    assert records[2]["id"] == "c2" and records[0]["prompt"] is None


def _bad_manifest(root) -> tuple:
    lines = [
        json.dumps({"audio": "clips/0.wav", "text": "good one"}),
        "{not json",
        json.dumps({"audio": "clips/1.wav"}),
        "",
        json.dumps({"audio": "clips/missing.wav", "text": "gone"}),
        json.dumps({"audio": "clips/2.wav", "text": 7}),
        json.dumps(["a", "list"]),
        json.dumps({"audio": "clips/2.wav", "text": "bad duration", "duration": -1}),
        json.dumps({"audio": "clips/2.wav", "text": "good two", "prompt": "spell it"}),
    ]
    (root / "empty.wav").write_bytes(b"")
    lines.append(json.dumps({"audio": "empty.wav", "text": "empty file"}))
    path = root / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, {2: "invalid JSON", 3: "missing 'text'", 5: "audio file not found", 6: "'text' must be a string",
                  7: "expected a JSON object", 8: "'duration' must be a positive", 10: "empty"}


def test_manifest_errors_name_file_and_line(corpus):
    root, _, _ = corpus
    path, expected = _bad_manifest(root)
    with pytest.raises(ManifestError) as info:
        read_manifest(path, on_error="raise")
    message = str(info.value)
    assert "7 unusable entries" in message
    for line, problem in expected.items():
        assert f"{path}:{line}: " in message and problem in message
    assert [issue.location for issue in info.value.issues] == [f"{path}:{line}" for line in expected]


def test_manifest_skip_reports_what_was_skipped(corpus, caplog):
    root, _, _ = corpus
    path, expected = _bad_manifest(root)
    with caplog.at_level(logging.WARNING, logger="speechlm.data.manifests"):
        manifest = read_manifest(path, on_error="skip")
    assert [r["text"] for r in manifest] == ["good one", "good two"]
    assert manifest[1]["prompt"] == "spell it"
    assert len(manifest.skipped) == len(expected)
    assert f"skipped {len(expected)} of 9 entries of {path}" in caplog.text
    assert f"{path}:3: missing 'text'" in caplog.text


def test_manifest_with_nothing_usable_fails_even_when_skipping(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio": "nope.wav", "text": "x"}\n')
    with pytest.raises(ManifestError, match="audio file not found"):
        read_manifest(path, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        read_manifest(path, on_error="ignore")
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "absent.jsonl")


def test_duration_filter_drops_and_reports(corpus, caplog):
    _, manifest, _ = corpus
    with caplog.at_level(logging.WARNING, logger="speechlm.data.manifests"):
        records = read_manifest(manifest, max_seconds=0.6)
    assert [r["id"] for r in records] == ["c0", "c1"]
    assert "longer than max_seconds" in str(records.skipped[0]) and "dropped 1 of 3" in caplog.text


def test_hf_dataset_records(corpus):
    import datasets

    root, _, rows = corpus
    paths = [str(root / row["audio"]) for row in rows]
    audio_column = datasets.Dataset.from_dict({"audio": paths, "text": ["a", "b", "c"]}).cast_column(
        "audio", datasets.Audio()
    )
    # Decoding an Audio column would need torchcodec; records read it undecoded (path/bytes) instead.
    records = records_from_dataset(audio_column, name="ds")
    assert [r["location"] for r in records] == ["ds[0]", "ds[1]", "ds[2]"]
    dataset = SpeechLMDataset(records, 16000)
    assert dataset[1]["audio"].shape == (int(0.3 * 16000),)  # 22.05 kHz file resampled to 16 kHz

    clip = make_clips()[0]
    decoded = datasets.Dataset.from_dict(
        {"audio": [{"array": clip, "sampling_rate": 16000}, {"array": [], "sampling_rate": 16000}],
         "sentence": ["decoded", "empty"]}
    )
    with pytest.raises(ManifestError, match=r"ds\[1\]: audio array must be 1-D and non-empty"):
        records_from_dataset(decoded, text_column="sentence", name="ds")
    records = records_from_dataset(decoded, on_error="skip", text_column="sentence")
    np.testing.assert_allclose(SpeechLMDataset(records, 16000)[0]["audio"], clip, atol=1e-6)

    plain = [{"audio": clip.astype(np.float64), "text": "plain"}]
    with pytest.raises(ManifestError, match="needs its 'sampling_rate'"):
        records_from_dataset(plain)
    assert records_from_dataset(plain, sampling_rate=16000)[0]["duration"] == pytest.approx(0.55)


def test_a_line_that_is_not_utf8_is_skipped_and_named_not_a_traceback(corpus):
    root, manifest, _ = corpus
    manifest.write_bytes(manifest.read_bytes() + b'{"audio": "clips/0.wav", "text": "caf\xe9"}\n')
    records = read_manifest(manifest, on_error="skip")
    assert len(records) == 3
    assert records.skipped[0].location == f"{manifest}:4" and "not UTF-8" in str(records.skipped[0])


def test_manifest_columns_speechlm_does_not_know_are_kept_in_extra(corpus):
    tmp_path, manifest, rows = corpus
    manifest.write_text("".join(json.dumps({**row, "source": "asterisk", "voice": "en-us"}) + "\n" for row in rows))
    assert read_manifest(manifest)[0]["extra"] == {"source": "asterisk", "voice": "en-us"}


def test_a_transcript_column_is_read_as_what_the_clip_says(corpus):
    tmp_path, manifest, rows = corpus
    answer = {**rows[0], "text": '{"intent": "call"}', "task": "slu", "transcript": "call mom"}
    manifest.write_text(json.dumps(answer) + "\n")
    assert read_manifest(manifest)[0]["transcript"] == "call mom"


def _text_file(tmp_path, rows) -> str:
    path = tmp_path / "text.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_text_examples_take_the_rows_prompt_or_their_tasks(tmp_path):
    path = _text_file(tmp_path, [{"transcript": "call mom", "text": "call", "prompt": "Intent:"},
                                 {"transcript": "play jazz", "text": "play", "task": "slu"}])
    found = read_text_examples(path, {"slu": "Intent as JSON:"})
    assert [(e["transcript"], e["text"], e["prompt"]) for e in found] == [("call mom", "call", "Intent:"),
                                                                          ("play jazz", "play", "Intent as JSON:")]


def test_text_example_problems_are_named_by_file_and_line(tmp_path):
    path = _text_file(tmp_path, [{"transcript": "call mom", "text": "call", "prompt": "Intent:"}, "{oops",
                                 {"transcript": "", "text": "x", "prompt": "p"}, {"transcript": "a", "text": "b"},
                                 {"transcript": "a", "text": "b", "task": "translate"}])
    with pytest.raises(ManifestError) as raised:
        read_text_examples(path, {"slu": "Intent as JSON:"})
    message = str(raised.value)
    assert f"{path}:2: not valid JSON" in message and f"{path}:3: needs a non-empty transcript" in message
    assert f"{path}:4: needs a prompt" in message and f"{path}:5: task 'translate' has no prompt" in message

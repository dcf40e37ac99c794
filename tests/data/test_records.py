"""One manifest entry -> a record: empty transcripts refused, chat rows validated (paths, durations, named errors)."""

from __future__ import annotations

import json

import pytest

from speechlm.data.manifests import ManifestError, read_manifest
from tests.data.conftest import chat_row


def test_empty_transcripts_are_refused_and_an_all_empty_manifest_does_not_train(corpus):
    root, manifest, rows = corpus
    manifest.write_text("".join(json.dumps({**row, "text": "  "}) + "\n" for row in rows))
    with pytest.raises(ManifestError, match="empty 'text'"):
        read_manifest(manifest, on_error="skip")


def test_chat_manifest_rows_resolve_paths_and_sum_durations(corpus, chat_manifest):
    root, _, _ = corpus
    records = read_manifest(chat_manifest)
    first = records[0]
    assert first["audio"] is None and first["id"] == "two" and first["text"] == "the second one"
    assert [part.source for part in first["messages"][1].clips] == [str(root.resolve() / "clips" / f"{i}.wav")
                                                                      for i in (0, 2)]
    assert first["duration"] == pytest.approx(0.55 + 0.8, abs=1e-3)
    assert records[1]["task"] == "qa" and records[1]["text"] == "monday" and records[2]["text"] == "play some jazz"


def test_chat_manifest_errors_name_file_line_and_part(corpus):
    root, _, _ = corpus
    lines = [
        chat_row("clips/0.wav"),
        chat_row("clips/missing.wav"),
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "clips/0.wav"}]}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {**chat_row("clips/0.wav"), "text": "both"},
        {"messages": []},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]},
                      {"role": "assistant", "content": "x"}]},
    ]
    path = root / "bad_chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    expected = {2: "messages[1].content[0]: audio file not found", 3: "no assistant message",
                4: "messages[0]: unknown role 'robot'", 5: "cannot also have 'text'",
                6: "'messages': empty conversation", 7: "messages[0].content[0]: unknown content part type 'video'"}
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert [issue.location for issue in info.value.issues] == [f"{path}:{line}" for line in expected]
    for line, problem in expected.items():
        assert f"{path}:{line}: " in str(info.value) and problem in str(info.value)
    assert len(read_manifest(path, on_error="skip")) == 1

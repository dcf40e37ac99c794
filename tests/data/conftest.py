"""Fixtures shared by the data tests: three clips with a manifest of relative paths, and a manifest of chat rows."""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from tests.conftest import make_clips


@pytest.fixture
def corpus(tmp_path):
    """Three clips in tmp/clips (one at 22.05 kHz) and a manifest with relative paths."""
    clips = make_clips()
    (tmp_path / "clips").mkdir()
    rows = []
    for index, clip in enumerate(clips):
        rate = 22050 if index == 1 else 16000
        if rate != 16000:
            import soxr

            clip = soxr.resample(clip, 16000, rate)
        sf.write(tmp_path / "clips" / f"{index}.wav", clip, rate)
        rows.append({"audio": f"clips/{index}.wav", "text": f"clip number {index}", "id": f"c{index}"})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path, manifest, rows


def chat_row(*clips: str, question: str = "what did they say", answer: str = "call mom", **extra) -> dict:
    content = [{"type": "audio", "audio": clip} for clip in clips] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": content},
                         {"role": "assistant", "content": answer}], **extra}


@pytest.fixture
def chat_manifest(corpus):
    """Chat rows (two clips in one, a follow-up turn in another) beside a plain audio + text row."""
    root, _, _ = corpus
    follow_up = chat_row("clips/1.wav", answer="seven thirty", task="qa")
    follow_up["messages"] += [{"role": "user", "content": "and the day"}, {"role": "assistant", "content": "monday"}]
    rows = [chat_row("clips/0.wav", "clips/2.wav", answer="the second one", id="two"), follow_up,
            {"audio": "clips/2.wav", "text": "play some jazz", "id": "plain"}]
    path = root / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path

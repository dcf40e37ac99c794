"""Fixtures shared by the evaluation tests: a three-clip manifest and a two-task (transcribe + slu) manifest."""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from tests.conftest import make_clips

GENERATE = {"max_new_tokens": 4}
SLU = '{"intent": "call", "contact": "mom"}'
PROMPTS = {"transcribe": "transcribe", "slu": "intent as json"}


@pytest.fixture
def manifest(tmp_path):
    rows = []
    for index, clip in enumerate(make_clips()):
        sf.write(tmp_path / f"{index}.wav", clip, 16000)
        rows.append({"audio": f"{index}.wav", "text": f"call mom {index}", "id": f"u{index}"})
    rows[2]["prompt"] = "spell it"
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def two_task_manifest(tmp_path):
    rows = []
    for index, clip in enumerate(make_clips(seconds=(0.55, 0.3, 0.8, 0.4))):
        sf.write(tmp_path / f"{index}.wav", clip, 16000)
        task = "transcribe" if index % 2 == 0 else "slu"
        rows.append({"audio": f"{index}.wav", "text": "call mom" if task == "transcribe" else SLU, "task": task,
                     "id": f"u{index}"})
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path

"""Fixtures shared by the inference tests: a tiny Whisper + Qwen2 model, saved once, and a long espeak-ng recording."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from speechlm.audio import load_audio
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


@pytest.fixture(scope="session")
def recording(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (speech TTS)")
    return espeak_recording(tmp_path_factory.mktemp("long"))


@pytest.fixture(scope="session")
def whisper_qwen(build):
    return build("whisper", "qwen2")


def save(processor, model, folder):
    """`folder` with the model and its processor side by side, as training saves them (what the CLI loads)."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def saved_model(whisper_qwen, tmp_path_factory):
    return save(*whisper_qwen, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def whisper_gpt2(build):
    """GPT-2 has a learned position table (512 here): past it, generation crashes with an IndexError."""
    return build("whisper", "gpt2")

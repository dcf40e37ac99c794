"""The normaliser's documented rules, and the Whisper (Open ASR Leaderboard) normaliser by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speechlm.evaluation.metrics import word_error_rate
from speechlm.evaluation.normalizers import build_normalizer, normalize_text, normalizer_description

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello, World!", "hello world"),
        ("  many   spaces\tand\nnewlines ", "many spaces and newlines"),
        ("Don't stop; it's 5 o'clock.", "don't stop it's 5 o'clock"),
        ("Don\u2019t", "don't"),  # typographic apostrophe
        ("'quoted' dogs' rock 'n' roll", "quoted dogs rock n roll"),
        ("well-known e-mail", "well known e mail"),
        ("Ten dollars, $10, 3.5%", "ten dollars 10 3 5"),  # numbers are not converted, symbols dropped
        ("\uff28\uff45\uff4c\uff4c\uff4f \ufb01ne", "hello fine"),  # NFKC: full-width letters, fi ligature
        ("Café NAÏVE", "café naïve"),
        ("zero\u200bwidth", "zero width"),
        ("...!?", ""),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Please press 1 for sales, or # to exit.", "please press one for sales or pound to exit"),
        ("Call-Forward on No Answer.", "call forward on no answer"),
        ("The time is 7 o'clock A.M.", "the time is seven o'clock a m"),
        ("3D audio... press *", "three d audio press star"),
        ("Room 007, 2.5 miles", "room zero zero seven two point five miles"),
    ],
)
def test_spell_numbers_gives_the_spoken_form(text, expected):
    assert normalize_text(text, spell_numbers=True) == expected


def test_normalizer_is_idempotent():
    text = "“Well,” she said — it's 10:30 A.M.!"
    assert normalize_text(normalize_text(text)) == normalize_text(text)


@pytest.fixture
def spelling(tmp_path):
    path = tmp_path / "normalizer.json"
    path.write_text(json.dumps({"colour": "color"}))
    return path


def test_whisper_normalizer_is_transformers_english_normalizer(spelling):
    normalize = build_normalizer("whisper", str(spelling))
    assert normalize("The colour, Mr. Smith, twenty five!") == "the color mister smith 25"
    assert word_error_rate(["it costs twenty five dollars"], ["It costs $25."], normalize=normalize)["wer"] == 0.0


def test_whisper_normalizer_reads_a_checkpoint_folder_and_says_where_from(spelling):
    description = normalizer_description(build_normalizer("whisper", str(spelling.parent)))
    assert description.startswith("Whisper EnglishTextNormalizer") and f"1 spellings from {spelling}" in description


def test_named_normalizers():
    assert build_normalizer("speechlm") is True and build_normalizer("none") is False
    assert normalizer_description(True) == "speechlm normalize_text"
    with pytest.raises(ValueError, match="unknown normaliser 'nemo'"):
        build_normalizer("nemo")


def test_whisper_normalizer_without_any_mapping_says_how_to_give_one(tmp_path):
    # Offline with an empty Hugging Face cache and no openai-whisper installed: a clear error, not a silent fallback.
    code = ("from speechlm.evaluation import build_normalizer\n"
            "try:\n    build_normalizer('whisper')\nexcept ValueError as error:\n    print(error)\n")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "--whisper-spelling PATH" in result.stdout, result.stdout + result.stderr

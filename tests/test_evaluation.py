"""WER/CER against hand-computed alignments, the normaliser's documented rules, and the report helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speechlm.evaluation import (
    build_normalizer,
    format_summary_table,
    normalize_text,
    normalizer_description,
    per_utterance_rows,
    word_error_rate,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]


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


def test_normalizer_is_idempotent():
    text = "“Well,” she said — it's 10:30 A.M.!"
    assert normalize_text(normalize_text(text)) == normalize_text(text)


@pytest.mark.parametrize(
    ("ref", "hyp", "counts"),
    [
        # (substitutions, deletions, insertions, hits)
        ("the cat sat on the mat", "the cat sat on the mat", (0, 0, 0, 6)),
        ("the cat sat on the mat", "the cat sat on mat", (0, 1, 0, 5)),
        ("the cat sat on the mat", "the dog sat on the mat", (1, 0, 0, 5)),
        ("the cat sat on the mat", "the cat sat on the red mat", (0, 0, 1, 6)),
        ("a b c d", "", (0, 4, 0, 0)),
        ("a b c d", "x a b c", (0, 1, 1, 3)),
    ],
)
def test_word_error_counts(ref, hyp, counts):
    metrics = word_error_rate([ref], [hyp])
    substitutions, deletions, insertions, hits = counts
    assert (metrics["substitutions"], metrics["deletions"], metrics["insertions"], metrics["hits"]) == counts
    assert metrics["n_ref_words"] == len(ref.split())
    assert metrics["wer"] == pytest.approx((substitutions + deletions + insertions) / len(ref.split()))


def test_corpus_wer_sums_errors_over_utterances():
    # 1 substitution in 4 words + 1 insertion in 2 words = 2 / 6, not the mean of per-utterance rates (0.375).
    metrics = word_error_rate(["a b c d", "e f"], ["a x c d", "e f g"])
    assert metrics["wer"] == pytest.approx(2 / 6)
    assert (metrics["substitutions"], metrics["insertions"], metrics["hits"], metrics["n_ref_words"]) == (1, 1, 5, 6)
    assert metrics["n_utterances"] == 2


def test_character_error_rate():
    metrics = word_error_rate(["abc de"], ["abd de"])
    assert metrics["cer"] == pytest.approx(1 / 6)  # the space counts as a character
    assert metrics["n_ref_chars"] == 6


def test_normalization_can_be_disabled():
    assert word_error_rate(["Hello, World!"], ["hello world"])["wer"] == 0.0
    assert word_error_rate(["Hello, World!"], ["hello world"], normalize=False)["wer"] == 1.0
    assert word_error_rate(["a  b "], [" a b"], normalize=False)["wer"] == 0.0  # whitespace is always collapsed


def test_single_strings_are_accepted():
    assert word_error_rate("a b", "a c")["substitutions"] == 1


def test_empty_references():
    metrics = word_error_rate(["a b", ""], ["a b", "x y"])
    assert (metrics["insertions"], metrics["n_ref_words"], metrics["wer"]) == (2, 2, 1.0)
    assert metrics["cer"] == 1.0  # "x y" is three inserted characters against the three of "a b"
    assert word_error_rate([""], [""])["wer"] == 0.0
    assert word_error_rate(["...", ""], ["", "!"])["wer"] == 0.0  # empty after normalisation
    assert word_error_rate([], [])["wer"] == 0.0
    assert math.isinf(word_error_rate([""], ["hallucinated words"])["wer"])


def test_mismatched_lengths_and_types():
    with pytest.raises(ValueError, match="got 2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="got 1 ids, 2 references and 2 hypotheses"):
        per_utterance_rows(["u1"], ["a", "b"], ["a", "b"])
    with pytest.raises(TypeError, match=r"hypotheses\[1\] must be a string"):
        word_error_rate(["a", "b"], ["a", None])


def test_per_utterance_rows_and_jsonl(tmp_path):
    rows = per_utterance_rows(["u1", "u2", "u3"], ["The cat.", "a b c d", ""], ["the cat", "a b", "¡hola!"])
    assert [row["id"] for row in rows] == ["u1", "u2", "u3"]
    assert rows[0] == {
        "id": "u1",
        "ref": "The cat.",
        "hyp": "the cat",
        "wer": 0.0,
        "cer": 0.0,
        "substitutions": 0,
        "deletions": 0,
        "insertions": 0,
        "n_ref_words": 2,
    }
    assert (rows[1]["wer"], rows[1]["deletions"]) == (0.5, 2)
    assert math.isinf(rows[2]["wer"]) and rows[2]["insertions"] == 1

    path = write_jsonl(rows, tmp_path / "reports" / "utterances.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and "¡hola!" in lines[2]  # UTF-8, not \u escapes
    loaded = [json.loads(line) for line in lines]
    assert loaded[1] == rows[1]
    assert loaded[2]["wer"] is None  # strict JSON: no Infinity


def test_format_summary_table():
    metrics = word_error_rate(["a b c d"], ["a x c"])
    table = format_summary_table({**metrics, "model": "tiny|model"}, "LibriSpeech test-clean")
    assert table.splitlines()[:5] == [
        "### LibriSpeech test-clean",
        "",
        "| Metric | Value |",
        "| --- | ---: |",
        "| WER | 50.00% |",
    ]
    assert "| Deletions | 1 |" in table and "| Reference words | 4 |" in table
    assert table.rstrip().endswith("| model | tiny\\|model |")  # unknown keys last, pipes escaped
    assert "| WER | inf |" in format_summary_table(word_error_rate([""], ["x"]), "silence")


def test_modules_do_not_import_torch():
    # Load both files standalone (the package __init__ pulls in transformers): their own imports must stay light.
    root = Path(__file__).resolve().parents[1]
    code = (
        "import importlib.util, sys\n"
        "for name in ('evaluation', 'audio'):\n"
        f"    spec = importlib.util.spec_from_file_location(name, {str(root / 'speechlm')!r} + f'/{{name}}.py')\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "heavy = [m for m in ('torch', 'transformers', 'jiwer') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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

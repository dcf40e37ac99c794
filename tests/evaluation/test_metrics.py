"""WER/CER against hand-computed alignments, corpus-level sums, empty references, and per-utterance rows."""

from __future__ import annotations

import math

import pytest

from speechlm.evaluation.metrics import per_utterance_rows, word_error_rate


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


def test_per_utterance_rows():
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

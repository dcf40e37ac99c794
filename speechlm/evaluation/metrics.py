"""Word and character error rates (corpus-level, errors summed over utterances) and per-utterance rows.

Alignment is jiwer's (Levenshtein over words, then over characters). Import-light: no torch, and jiwer is imported
on first use, so that `speechlm --help` and the server's startup do not pay for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from .normalizers import normalize_text


def as_list(texts: str | Sequence[str], what: str) -> list[str]:
    """One string or a sequence of strings -> a list of strings; `what` names the argument in the TypeError."""
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{index}] must be a string, got {type(text).__name__}")
    return texts


def _prepare(references: str | Sequence[str], hypotheses: str | Sequence[str], normalize: bool | Callable):
    references, hypotheses = as_list(references, "references"), as_list(hypotheses, "hypotheses")
    if len(references) != len(hypotheses):
        raise ValueError(f"got {len(references)} references but {len(hypotheses)} hypotheses; they must pair up")
    if callable(normalize):
        clean = lambda text: " ".join(normalize(text).split())  # noqa: E731
    else:
        clean = normalize_text if normalize else (lambda text: " ".join(text.split()))
    return [clean(text) for text in references], [clean(text) for text in hypotheses]


def _rate(errors: int, n_reference: int) -> float:
    # With no reference words the rate is undefined: 0.0 when nothing was hypothesised either, inf otherwise (any
    # finite number would hide that a silent clip was "transcribed").
    if n_reference == 0:
        return 0.0 if errors == 0 else math.inf
    return errors / n_reference


def _error_counts(references: list[str], hypotheses: list[str]) -> dict[str, Any]:
    """Corpus-level counts over already-cleaned texts; empty references are counted here, not handed to jiwer.

    jiwer 3 rejects empty references and jiwer 4 reports a raw insertion count as their "WER"; for an empty
    reference every hypothesis word (character) is simply an insertion.
    """
    import jiwer

    pairs = [(ref, hyp) for ref, hyp in zip(references, hypotheses) if ref]
    counts = dict(substitutions=0, deletions=0, insertions=0, hits=0, char_errors=0, n_ref_chars=0)
    for ref, hyp in zip(references, hypotheses):
        if not ref and hyp:
            counts["insertions"] += len(hyp.split())
            counts["char_errors"] += len(hyp)
    if pairs:
        refs, hyps = [ref for ref, _ in pairs], [hyp for _, hyp in pairs]
        words = jiwer.process_words(refs, hyps)
        chars = jiwer.process_characters(refs, hyps)
        counts["substitutions"] += words.substitutions
        counts["deletions"] += words.deletions
        counts["insertions"] += words.insertions
        counts["hits"] += words.hits
        counts["char_errors"] += chars.substitutions + chars.deletions + chars.insertions
        counts["n_ref_chars"] += chars.hits + chars.substitutions + chars.deletions
    return counts


def word_error_rate(
    references: str | Sequence[str], hypotheses: str | Sequence[str], normalize: bool | Callable[[str], str] = True
) -> dict[str, Any]:
    """Corpus WER and CER of `hypotheses` against `references` (errors summed over utterances, not averaged).

    Returns `wer`, `cer`, `substitutions`, `deletions`, `insertions`, `hits` (word counts), `n_ref_words`,
    `n_ref_chars` and `n_utterances`. With `normalize`, both sides go through `normalize_text` first (or through
    `normalize` itself when it is a function, e.g. `build_normalizer("whisper")`); otherwise only whitespace is
    collapsed. An empty reference contributes its hypothesis words as insertions; when the whole corpus
    has no reference words the rates are 0.0 if the hypotheses are empty too, else `inf`.
    """
    references, hypotheses = _prepare(references, hypotheses, normalize)
    counts = _error_counts(references, hypotheses)
    n_ref_words = counts["hits"] + counts["substitutions"] + counts["deletions"]
    word_errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    return {
        "wer": _rate(word_errors, n_ref_words),
        "cer": _rate(counts["char_errors"], counts["n_ref_chars"]),
        "substitutions": counts["substitutions"],
        "deletions": counts["deletions"],
        "insertions": counts["insertions"],
        "hits": counts["hits"],
        "n_ref_words": n_ref_words,
        "n_ref_chars": counts["n_ref_chars"],
        "n_utterances": len(references),
    }


def per_utterance_rows(
    ids: Sequence[Any], references: Sequence[str], hypotheses: Sequence[str],
    normalize: bool | Callable[[str], str] = True,
) -> list[dict[str, Any]]:
    """One row per utterance (`id`, `ref`, `hyp` as given, then its `wer`, `cer` and error counts), for error analysis.

    The rates are computed like `word_error_rate` on that utterance alone.
    """
    ids = list(ids)
    if not (len(ids) == len(references) == len(hypotheses)):
        raise ValueError(
            f"got {len(ids)} ids, {len(references)} references and {len(hypotheses)} hypotheses; they must pair up"
        )
    rows = []
    for utterance_id, reference, hypothesis in zip(ids, references, hypotheses):
        metrics = word_error_rate(reference, hypothesis, normalize=normalize)
        rows.append(
            {
                "id": utterance_id,
                "ref": reference,
                "hyp": hypothesis,
                "wer": metrics["wer"],
                "cer": metrics["cer"],
                "substitutions": metrics["substitutions"],
                "deletions": metrics["deletions"],
                "insertions": metrics["insertions"],
                "n_ref_words": metrics["n_ref_words"],
            }
        )
    return rows

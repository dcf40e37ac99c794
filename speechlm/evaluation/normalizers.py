"""Text normalisers for scoring: ours (`normalize_text`, light) and the Open ASR Leaderboard's (Whisper's).

`build_normalizer(name)` gives the `normalize` argument the scorers take; `normalizer_description` names it in
reports, since a WER means little without the normaliser it was computed under. Import-light: no torch; transformers
is imported only when the Whisper normaliser is built.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from pathlib import Path

from .number_words import spell_numbers as _spell_numbers

# Typographic apostrophes and look-alikes, so "don’t" (as LLMs and word processors write it) matches "don't".
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'"})


def normalize_text(text: str, spell_numbers: bool = False) -> str:
    """A deliberately small English normaliser, so that WER counts recognition errors rather than formatting.

    In order: Unicode NFKC (full-width and ligature forms become plain ones), typographic apostrophes become `'`,
    lowercase, with `spell_numbers` numbers and the symbols * # & % become spoken words
    (`speechlm.evaluation.number_words`: "7.5%" -> "seven point five percent"), every punctuation, symbol or
    control character becomes a space except an apostrophe between two letters or digits ("don't", "o'clock" are
    kept; the quotes in "'hello'" and the apostrophe of "dogs'" are not), and whitespace runs collapse to one space.

    Nothing else: numbers are kept as written unless `spell_numbers` ("10" and "ten" differ), contractions are not
    expanded ("don't" and "do not" differ), spellings are not unified ("colour"/"color"), and a hyphen or decimal
    point splits a token ("well-known" -> "well known", "3.5" -> "3 5"). Use the same normaliser on both sides; for
    comparisons with published numbers, check which normaliser they used (Whisper's is much more aggressive).
    """
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    if spell_numbers:
        text = _spell_numbers(text)
    characters = []
    for index, character in enumerate(text):
        if character == "'":
            inside_word = 0 < index < len(text) - 1 and text[index - 1].isalnum() and text[index + 1].isalnum()
            characters.append(character if inside_word else " ")
        elif unicodedata.category(character)[0] in "PSCZ":  # punctuation, symbols, control/format, separators
            characters.append(" ")
        else:
            characters.append(character)
    return " ".join("".join(characters).split())


NORMALIZERS = ("speechlm", "whisper", "none")
# Where Whisper's American-spelling mapping may already be on disk: openai-whisper and whisper-normalizer bundle it.
_SPELLING_PACKAGES = (("whisper", "normalizers/english.json"), ("whisper_normalizer", "english.json"))
_SPELLING_REPO = "openai/whisper-tiny.en"


def build_normalizer(name: str = "speechlm", spelling: str | None = None) -> bool | Callable[[str], str]:
    """The `normalize` argument of the scorers for a normaliser name: "speechlm" (`normalize_text`, True), "none"
    (False) or "whisper": transformers' Whisper `EnglishTextNormalizer`, the one the Open ASR Leaderboard scores with
    (numbers as digits, contractions expanded, fillers dropped, British spellings made American), so that WER can be
    set beside published figures.

    The spelling mapping comes from `spelling` (a `normalizer.json`/`english.json` file, a Whisper checkpoint folder
    holding `normalizer.json`, a Hub model id, or "none" for no mapping), else from an installed openai-whisper or
    whisper-normalizer package, else from the Hub's openai/whisper-tiny.en (the Hugging Face cache, so it works
    offline once fetched); a ValueError says how to provide it when none is reachable.
    """
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normaliser {name!r}; choose one of {', '.join(NORMALIZERS)}")
    if name != "whisper":
        return name == "speechlm"
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping, source = _spelling_mapping(spelling)
    normalizer = EnglishTextNormalizer(mapping)

    def whisper_english(text: str) -> str:
        return normalizer(text)

    whisper_english.description = (f"Whisper EnglishTextNormalizer (transformers; the Open ASR Leaderboard's), "
                                   f"{len(mapping)} spellings from {source}")  # fmt: skip
    return whisper_english


def _spelling_mapping(spelling: str | None) -> tuple[dict[str, str], str]:
    import importlib.util

    if spelling == "none":
        return {}, "nowhere (no spelling mapping)"
    candidates = []
    if spelling is not None and Path(spelling).exists():
        path = Path(spelling)
        candidates.append(path / "normalizer.json" if path.is_dir() else path)
    elif spelling is None:
        for package, relative in _SPELLING_PACKAGES:
            spec = importlib.util.find_spec(package)
            for root in (spec.submodule_search_locations or []) if spec else []:
                candidates.append(Path(root) / relative)
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")), str(path)
    repo = spelling or _SPELLING_REPO
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, "normalizer.json")
    except Exception as error:  # offline, no such repo, no such file: all mean "not reachable from here"
        raise ValueError(
            f"no English spelling mapping for the Whisper normaliser ({type(error).__name__} for {repo}/normalizer.json"
            f"{'' if spelling else ', and neither openai-whisper nor whisper-normalizer is installed'}): pass a "
            "normalizer.json file or a Whisper checkpoint folder (--whisper-spelling PATH), or 'none' for no mapping"
        ) from None
    return json.loads(Path(path).read_text(encoding="utf-8")), f"{repo}/normalizer.json"


def normalizer_description(normalize: bool | Callable[[str], str]) -> str:
    """How texts were normalised before scoring, for reports (a number means little without it)."""
    if callable(normalize):
        return getattr(normalize, "description", None) or getattr(normalize, "__name__", type(normalize).__name__)
    return "speechlm normalize_text" if normalize else "none (whitespace collapsed only)"

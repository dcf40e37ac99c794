"""The demo's text form: lower-case words, numbers spelled the way people say them, keypad symbols named.

One form for every transcript (rendered, Asterisk, LibriVox, UQM, and the hypotheses before scoring), so that WER
compares words, not spellings: the library's `normalize_text(text, spell_numbers=True)`
(`speechlm.evaluation.normalizers`), whose cardinals (`number_to_words`) the grammar also speaks. Here: the ordinals
that dates are spoken with.
"""

from __future__ import annotations

from ..evaluation.number_words import digits_to_words, number_to_words

__all__ = ["WORDS_PATTERN", "digits_to_words", "number_to_words", "ordinal_words"]

# That form as a regular expression: lower-case words (apostrophes inside) one space apart, nothing before or after;
# what a transcript the model writes inside a JSON answer is held to (`understanding.slu_schema`).
WORDS_PATTERN = r"[a-z']+(?: [a-z']+)*"

_IRREGULAR_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                       "nine": "ninth", "twelve": "twelfth"}


def ordinal_words(n: int) -> str:
    """21 -> "twenty first": dates are spoken as ordinals."""
    *head, last = number_to_words(n).split()
    if last in _IRREGULAR_ORDINALS:
        last = _IRREGULAR_ORDINALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*head, last])

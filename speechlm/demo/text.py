"""The demo's text form: lower-case words, numbers spelled the way people say them, keypad symbols named.

One form for every transcript (rendered, Asterisk, LibriVox, UQM, and the hypotheses before scoring), so that WER
compares words, not spellings.
"""

from __future__ import annotations

import re

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen".split()
_ONES += ["seventeen", "eighteen", "nineteen"]
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_IRREGULAR_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                       "nine": "ninth", "twelve": "twelfth"}


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
        if n == 0:
            return words
    if n < 20:
        words.append(_ONES[n])
    else:
        words.append(_TENS[n // 10])
        if n % 10:
            words.append(_ONES[n % 10])
    return words


def number_to_words(n: int) -> str:
    """American cardinal without "and": 1234 -> "one thousand two hundred thirty four" (the form our text uses)."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 1000:
        return " ".join(_below_thousand(n))
    words: list[str] = []
    for value, name in _SCALES:
        if n >= value:
            words += [number_to_words(n // value), name]
            n %= value
    if n:
        words += _below_thousand(n)
    return " ".join(words)


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


def digits_to_words(digits: str) -> str:
    """"3472" -> "three four seven two": codes and phone numbers are read digit by digit."""
    return " ".join(_ONES[int(d)] for d in digits if d.isdigit())


def _spell_number(match: re.Match[str]) -> str:
    token = match.group(0)
    if "." in token:
        whole, frac = token.split(".")
        return f" {number_to_words(int(whole))} point {digits_to_words(frac)} "
    if len(token) > 1 and token.startswith("0"):
        return f" {digits_to_words(token)} "
    return f" {number_to_words(int(token))} "


def normalise_text(text: str) -> str:
    """Any transcript -> the corpus text form: lower case, words only, digits spelled, keypad symbols named."""
    text = text.lower().replace("\u2019", "'").replace("`", "'")
    text = text.replace("*", " star ").replace("#", " pound ").replace("&", " and ").replace("%", " percent ")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    text = re.sub(r"\d+(?:\.\d+)?", _spell_number, text)
    text = re.sub(r"\b([a-z])\.", r"\1 ", text)  # a.m. -> a m
    text = re.sub(r"[^a-z']+", " ", text)
    words = (w.strip("'") for w in text.split())
    return " ".join(w for w in words if w)

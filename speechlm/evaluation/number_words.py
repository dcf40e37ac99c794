"""Numbers as spoken English words, for `normalize_text(..., spell_numbers=True)`: "7" and "seven" score alike.

American cardinals without "and" (1234 -> "one thousand two hundred thirty four"), decimals with "point" and their
digits one by one, numbers with a leading zero (codes, "007") digit by digit, thousands separators dropped, and the
symbols people say aloud in transcripts (`*` star, `#` pound, `&` and, `%` percent) named.
"""

from __future__ import annotations

import re

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen".split()
_ONES += ["seventeen", "eighteen", "nineteen"]
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_SPOKEN_SYMBOLS = str.maketrans({"*": " star ", "#": " pound ", "&": " and ", "%": " percent "})


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
    """American cardinal without "and": 1234 -> "one thousand two hundred thirty four"."""
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


def digits_to_words(digits: str) -> str:
    """"3472" -> "three four seven two": codes and phone numbers are read digit by digit."""
    return " ".join(_ONES[int(d)] for d in digits if d.isdigit())


def _spell_number(match: re.Match[str]) -> str:
    token = match.group(0)
    if "." in token:
        whole, fraction = token.split(".")
        return f" {number_to_words(int(whole))} point {digits_to_words(fraction)} "
    if len(token) > 1 and token.startswith("0"):
        return f" {digits_to_words(token)} "
    return f" {number_to_words(int(token))} "


def spell_numbers(text: str) -> str:
    """Every number in `text` as words and the spoken symbols named; everything else is left as it is."""
    text = text.translate(_SPOKEN_SYMBOLS)
    text = re.sub(r"(?<=[0-9]),(?=[0-9]{3})", "", text)
    return re.sub(r"[0-9]+(?:\.[0-9]+)?", _spell_number, text)

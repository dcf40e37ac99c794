"""Numbers as spoken words (speechlm/evaluation/number_words.py)."""

from __future__ import annotations

import pytest

from speechlm.evaluation.number_words import digits_to_words, number_to_words, spell_numbers


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (42, "forty two"),
        (100, "one hundred"),
        (305, "three hundred five"),
        (1000, "one thousand"),
        (1234, "one thousand two hundred thirty four"),
        (2_000_017, "two million seventeen"),
        (-5, "minus five"),
    ],
)
def test_number_to_words(n: int, words: str) -> None:
    assert number_to_words(n) == words


def test_digits_are_read_one_by_one() -> None:
    assert digits_to_words("3472") == "three four seven two"


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("press 1", "press  one "),
        ("2.5 miles", " two point five  miles"),
        ("room 007", "room  zero zero seven "),
        ("1,200 rows", " one thousand two hundred  rows"),
        ("press * or #", "press  star  or  pound "),
        ("50% & more", " fifty  percent   and  more"),
    ],
)
def test_spell_numbers_leaves_the_rest_as_written(text: str, spoken: str) -> None:
    assert spell_numbers(text) == spoken

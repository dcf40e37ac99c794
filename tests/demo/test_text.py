"""The demo's text form (speechlm/demo/text.py): numbers spelled as spoken, symbols named, punctuation gone."""

from __future__ import annotations

import pytest

from speechlm.demo import text as c


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
    assert c.number_to_words(n) == words


def test_ordinals_and_digits() -> None:
    assert [c.ordinal_words(i) for i in (1, 2, 3, 5, 12, 20, 21, 30, 31)] == [
        "first", "second", "third", "fifth", "twelfth", "twentieth", "twenty first", "thirtieth", "thirty first",
    ]  # fmt: skip
    assert c.digits_to_words("3472") == "three four seven two"


def test_normalise_text() -> None:
    assert c.normalise_text("Please press 1 for sales, or # to exit.") == "please press one for sales or pound to exit"
    assert c.normalise_text("Call-Forward on No Answer.") == "call forward on no answer"
    assert c.normalise_text("The time is 7 o'clock A.M.") == "the time is seven o'clock a m"
    assert c.normalise_text("3D audio... press *") == "three d audio press star"
    assert c.normalise_text("Room 007, 2.5 miles") == "room zero zero seven two point five miles"

"""The demo's text form (speechlm/demo/text.py): dates are spoken as ordinals."""

from __future__ import annotations

from speechlm.demo import text as c


def test_ordinals() -> None:
    assert [c.ordinal_words(i) for i in (1, 2, 3, 5, 12, 20, 21, 30, 31)] == [
        "first", "second", "third", "fifth", "twelfth", "twentieth", "twenty first", "thirtieth", "thirty first",
    ]  # fmt: skip

"""The structured domain's grammar (speechlm/demo/grammar.py): deterministic, clean, held-out by string."""

from __future__ import annotations

import re

from speechlm.demo import grammar as c

WORDS = re.compile(r"[a-z']+( [a-z']+)*")


def test_sentences_are_deterministic_and_clean() -> None:
    first = c.build_sentences(300, seed=0)
    assert first == c.build_sentences(300, seed=0)
    assert first != c.build_sentences(300, seed=1)
    assert len(set(first)) == 300
    assert all(WORDS.fullmatch(s) for s in first)
    assert not any(ch.isdigit() for s in first for ch in s)


def test_train_test_sentences_are_disjoint() -> None:
    train, test = c.split_sentences(3000, 200, seed=0)
    assert len(train) == 3000 and len(test) == 200
    assert not set(train) & set(test)
    other_train, _ = c.split_sentences(3000, 10, seed=7)  # held-out is a property of the string, not of the seed
    assert not set(other_train) & set(test)
    assert all(c.is_held_out(s) for s in test)


def test_vocabulary_is_a_few_hundred_words() -> None:
    vocab = c.vocabulary()
    assert 300 <= len(vocab) <= 800
    used = {w for s in c.build_sentences(5000, seed=3) for w in s.split()}
    assert used <= vocab

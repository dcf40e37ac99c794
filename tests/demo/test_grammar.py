"""The structured domain's grammar (speechlm/demo/grammar.py): deterministic, clean, held-out by string."""

from __future__ import annotations

import re

import pytest

from speechlm.demo import grammar as c
from speechlm.demo.text import WORDS_PATTERN

WORDS = re.compile(WORDS_PATTERN)  # the form transcript fields of JSON answers are held to


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


def test_text_only_sentences_are_distinct_and_never_held_out() -> None:
    found = c.text_only_utterances(3000, seed=0)
    texts = [u.text for u in found]
    assert len(set(texts)) == 3000
    assert not any(c.is_held_out(t) for t in texts)


def test_text_only_sentences_drawn_with_repeats_give_a_starved_template_its_share() -> None:
    """Distinct sentences cap `queue_position` at the few strings it can say; drawn with repeats it gets its share."""
    n = 20_000
    share = c.intent_shares()["queue_position"] * n
    distinct = sum(u.intent == "queue_position" for u in c.text_only_utterances(n, seed=0))
    repeated = c.text_only_utterances(n, seed=0, distinct=False)
    drawn = sum(u.intent == "queue_position" for u in repeated)
    assert distinct < share / 4
    assert abs(drawn - share) <= 5 * share**0.5
    assert len(repeated) == n and not any(c.is_held_out(u.text) for u in repeated)


def test_text_only_sentences_come_from_a_stream_of_their_own() -> None:
    train, _ = c.split_sentences(3000, 10, seed=0)
    fresh = [u.text for u in c.text_only_utterances(3000, seed=0)]
    assert fresh[:50] != train[:50]  # not the training clips' sentences replayed in the same order


def test_vocabulary_is_a_few_hundred_words() -> None:
    vocab = c.vocabulary()
    assert 300 <= len(vocab) <= 800
    used = {w for s in c.build_sentences(5000, seed=3) for w in s.split()}
    assert used <= vocab


def test_annotated_expansion_draws_exactly_what_plain_expansion_draws() -> None:
    """Meanings come from replaying the stream, so the annotated expansion must consume the same random draws and
    give the same text as the one the corpus was rendered from."""
    import random

    for template in [t for templates in c.TEMPLATES.values() for t in templates]:
        plain, annotated = random.Random(template), random.Random(template)
        assert c.expand_template(template, annotated).text == c._expand(template, plain)
        assert plain.random() == annotated.random()


def test_every_sentence_of_a_split_gets_its_meaning_back() -> None:
    train, test = c.split_sentences(400, 40, seed=5)
    meanings = c.utterances(train + test, seed=5)
    assert set(meanings) == set(train + test)
    for text, utterance in meanings.items():
        values = [value for _, value in utterance.slots]
        position = 0
        for value in values:  # slot values are spoken in order
            position = text.index(value, position) + len(value)
        keys = [key for key, _ in utterance.slots]
        assert len(keys) == len(set(keys)) and utterance.intent


def test_texts_the_grammar_did_not_make_have_no_meaning() -> None:
    assert c.utterances(["completely unrelated words here"], seed=0) == {}


def test_intent_shares_are_the_streams_draw_frequencies() -> None:
    """The benchmark compares training counts with these shares: they must be what the stream draws, repeats and all."""
    draws = 40_000
    stream = c._utterance_stream(5)
    counts: dict[str, int] = {}
    for _ in range(draws):
        intent = next(stream).intent
        counts[intent] = counts.get(intent, 0) + 1
    shares = c.intent_shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert set(counts) <= set(shares)
    for intent, share in shares.items():  # 5 binomial standard deviations
        assert abs(counts.get(intent, 0) - share * draws) <= 5 * (share * draws) ** 0.5 + 1, intent


def test_intents_are_snake_case_names_for_every_template() -> None:
    intents = [c.intent_of(t) for templates in c.TEMPLATES.values() for t in templates]
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", intent) for intent in intents)
    assert c.intent_of("set an alarm for {time}") == c.intent_of("set an alarm for {time} {date}") == "set_alarm"
    assert 80 <= len(set(intents)) <= len(intents)


@pytest.fixture(scope="module")
def sentence_pattern() -> re.Pattern:
    return re.compile(c.sentence_pattern())


def test_the_sentence_pattern_matches_every_sentence_the_grammar_makes(sentence_pattern) -> None:
    train, test = c.split_sentences(3000, 200, seed=0)
    assert all(sentence_pattern.fullmatch(s) for s in train + test)


@pytest.mark.parametrize("text", ["set an alarm for seven thirteen tomorrow",  # no such minute
                                  "press five for",  # unfinished
                                  "set an alarm for seven thirty tomorrow please"])
def test_the_sentence_pattern_refuses_what_the_grammar_cannot_say(sentence_pattern, text) -> None:
    assert sentence_pattern.fullmatch(text) is None

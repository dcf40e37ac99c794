"""Structured outputs (speechlm/inference/structured.py): answers held to a JSON schema while decoding.

The model is tiny and untrained, so free decoding gives byte soup: an answer that parses and follows the schema can
only come from the constraint.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from speechlm.inference.decoding import transcribe_arrays
from speechlm.inference.structured import schema_grammar, with_json_schema
from tests.conftest import make_clips

# Whitespace fixed (x-guidance): an untrained model would otherwise pad the JSON with spaces until max_new_tokens.
SCHEMA = {
    "type": "object",
    "properties": {"intent": {"enum": ["play_music", "set_alarm", "call"]}, "when": {"enum": ["now", "later"]}},
    "required": ["intent", "when"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
TOKENS = 40


def follows_schema(text: str) -> bool:
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return False
    return set(answer) == {"intent", "when"} and answer["intent"] in {"play_music", "set_alarm", "call"} and \
        answer["when"] in {"now", "later"}


def test_untrained_model_answers_follow_the_schema(whisper_qwen):
    processor, model = whisper_qwen
    answers = transcribe_arrays(model, processor, make_clips(), max_new_tokens=TOKENS, json_schema=SCHEMA)
    assert all(map(follows_schema, answers)), answers


def test_free_decoding_of_the_same_model_does_not(whisper_qwen):
    """The contrast that makes the test above mean something."""
    processor, model = whisper_qwen
    answers = transcribe_arrays(model, processor, make_clips(), max_new_tokens=TOKENS)
    assert not any(map(follows_schema, answers)), answers


def test_batched_schema_answers_equal_one_by_one(whisper_qwen):
    processor, model = whisper_qwen
    clips = make_clips((0.55, 0.3, 0.8, 1.1), seed=3)
    batched = transcribe_arrays(model, processor, clips, batch_size=4, max_new_tokens=TOKENS, json_schema=SCHEMA)
    alone = [transcribe_arrays(model, processor, [clip], max_new_tokens=TOKENS, json_schema=SCHEMA)[0]
             for clip in clips]
    assert batched == alone


def test_beam_search_answers_follow_the_schema(whisper_qwen):
    """Beams are reordered between steps: each keeps the grammar state of its own prefix."""
    processor, model = whisper_qwen
    answers = transcribe_arrays(model, processor, make_clips(), max_new_tokens=TOKENS, num_beams=3,
                                json_schema=json.dumps(SCHEMA))
    assert all(map(follows_schema, answers)), answers


@pytest.mark.parametrize(("schema", "message"), [
    ("{not json", "is not valid JSON"), ([1, 2], "must be a JSON object"),
    ({"type": "objekt"}, "is not usable: .*objekt"),
])
def test_an_unusable_schema_is_refused_with_the_reason(schema, message):
    with pytest.raises(ValueError, match=f"json_schema {message}"):
        schema_grammar(schema)


def test_an_unusable_schema_fails_before_decoding(whisper_qwen):
    processor, model = whisper_qwen
    with pytest.raises(ValueError, match="json_schema"):
        transcribe_arrays(model, processor, make_clips(), max_new_tokens=TOKENS, json_schema={"type": "objekt"})


def test_sampled_answers_follow_the_schema(whisper_qwen):
    """The mask comes before temperature and top-p, which then choose among allowed tokens only."""
    processor, model = whisper_qwen
    answers = transcribe_arrays(model, processor, make_clips(), max_new_tokens=TOKENS, do_sample=True,
                                temperature=1.0, top_p=0.5, json_schema=SCHEMA)
    assert all(map(follows_schema, answers)), answers


class BanEverything(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return torch.full_like(scores, float("-inf"))


def test_answers_keep_to_the_schema_when_an_earlier_processor_bans_every_allowed_token(whisper_qwen):
    processor, model = whisper_qwen
    answers = transcribe_arrays(model, processor, make_clips(), max_new_tokens=TOKENS, json_schema=SCHEMA,
                                logits_processor=LogitsProcessorList([BanEverything()]))
    assert all(map(follows_schema, answers)), answers


def test_the_callers_end_token_ends_a_schema_answer(whisper_qwen):
    """A chat passes its end-of-turn token: the answer may end there, not only at the model's own end token."""
    processor, model = whisper_qwen
    turn_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    options = with_json_schema({"json_schema": SCHEMA, "eos_token_id": turn_end}, model, processor.tokenizer)
    assert options["logits_processor"][-1].eos_token_ids == [turn_end] and "json_schema" not in options


# A short answer (a time, a digit string) held to a regular expression: the same processor, another grammar.
TIME = r"(seven|eight|nine) (fifteen|thirty)"


def test_untrained_model_answers_match_a_regex(whisper_qwen):
    processor, model = whisper_qwen
    answers = transcribe_arrays(model, processor, make_clips(), max_new_tokens=TOKENS, regex=TIME)
    assert all(re.fullmatch(TIME, answer) for answer in answers), answers


def test_free_decoding_does_not_match_the_regex(whisper_qwen):
    processor, model = whisper_qwen
    answers = transcribe_arrays(model, processor, make_clips(), max_new_tokens=TOKENS)
    assert not any(re.fullmatch(TIME, answer) for answer in answers), answers


@pytest.mark.parametrize(("options", "message"), [
    ({"regex": "(unclosed"}, "regex '(unclosed' is not usable"), ({"regex": ""}, "regex must be a non-empty"),
    ({"regex": TIME, "json_schema": SCHEMA}, "json_schema or regex, not both"),
])  # fmt: skip
def test_a_bad_regex_option_fails_before_decoding(whisper_qwen, options, message):
    processor, model = whisper_qwen
    with pytest.raises(ValueError, match=re.escape(message)):
        transcribe_arrays(model, processor, make_clips(), max_new_tokens=TOKENS, **options)


DIGITS = r"[0-9]{2}"


def test_each_clip_follows_its_own_structure(whisper_qwen):
    """A list gives each clip its own regex, schema or none (e.g. each question its own answer pattern): every clip
    gets what it would get alone, whatever its batch-mates ask for."""
    processor, model = whisper_qwen
    clips = make_clips((0.9, 0.4, 0.7, 0.5))
    regexes, schemas = [TIME, DIGITS, None, None], [None, None, SCHEMA, None]
    answers = transcribe_arrays(model, processor, clips, batch_size=4, max_new_tokens=TOKENS, regex=regexes,
                                json_schema=schemas)
    alone = [transcribe_arrays(model, processor, [clip], max_new_tokens=TOKENS, regex=regex, json_schema=schema)[0]
             for clip, regex, schema in zip(clips, regexes, schemas)]
    assert answers == alone
    assert re.fullmatch(TIME, answers[0]) and re.fullmatch(DIGITS, answers[1]) and follows_schema(answers[2])


def test_a_structure_list_needs_one_entry_per_clip(whisper_qwen):
    processor, model = whisper_qwen
    with pytest.raises(ValueError, match=re.escape("3 clip(s) but 2 regex value(s)")):
        transcribe_arrays(model, processor, make_clips((0.5, 0.5, 0.5)), max_new_tokens=TOKENS, regex=[TIME, None])


def test_one_bad_regex_in_a_list_fails_before_decoding(whisper_qwen):
    processor, model = whisper_qwen
    with pytest.raises(ValueError, match=re.escape("regex '(unclosed' is not usable")):
        transcribe_arrays(model, processor, make_clips((0.5, 0.5)), max_new_tokens=TOKENS, regex=[TIME, "(unclosed"])


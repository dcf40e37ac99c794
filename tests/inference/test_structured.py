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
from speechlm.inference.structured import (
    WORDS_FROM,
    first_quoted,
    quoted_schema,
    quoted_throughout,
    schema_grammar,
    shared_fields,
    with_json_schema,
    word_runs,
)
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


def batched_and_alone(processor, model, **options) -> tuple[list[str], list[str]]:
    """Four clips' answers decoded as one batch, and each decoded alone."""
    clips = make_clips((0.55, 0.3, 0.8, 1.1), seed=3)
    batched = transcribe_arrays(model, processor, clips, batch_size=4, **options)
    return batched, [transcribe_arrays(model, processor, [clip], **options)[0] for clip in clips]


def test_batched_schema_answers_equal_one_by_one(whisper_qwen):
    batched, alone = batched_and_alone(*whisper_qwen, max_new_tokens=TOKENS, json_schema=SCHEMA)
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



# ------------------------------------------------------------------------------- slot values quoted from a transcript
COLOURS = "red|green|blue|black|white|pink|grey|brown|orange|purple|gold|silver"
FRAMES = {
    "anyOf": [
        {"type": "object", "additionalProperties": False, "required": ["transcript", "intent", "colour"],
         "properties": {"transcript": {"type": "string"}, "intent": {"const": "paint"},
                        "colour": {"type": "string", "pattern": f"^(?:{COLOURS})$"}}},
        {"type": "object", "additionalProperties": False, "required": ["transcript", "intent", "name"],
         "properties": {"transcript": {"type": "string"}, "intent": {"const": "call"},
                        "name": {"type": "string", "enum": ["mum", "dad", "anna lee"]}}},
    ],
    "x-guidance": {"whitespace_flexible": False},
    WORDS_FROM: "transcript",
}


def test_word_runs_are_every_run_of_whole_words_once():
    assert word_runs("call anna lee") == ["call", "anna", "lee", "call anna", "anna lee", "call anna lee"]


def slot_values(schema: dict) -> dict:
    """intent -> its slot field's schema, in each frame of a schema shaped like FRAMES."""
    return {frame["properties"]["intent"]["const"]: next(v for k, v in frame["properties"].items()
                                                        if k not in ("transcript", "intent"))
            for frame in schema["anyOf"]}


def test_a_quoted_schema_holds_each_slot_to_words_of_the_transcript():
    narrowed = quoted_schema(FRAMES, "call anna lee or paint it red")
    assert slot_values(narrowed) == {"paint": {"type": "string", "enum": ["red"]},
                                     "call": {"type": "string", "enum": ["anna lee"]}}


def test_a_quoted_schema_fixes_the_transcript_it_was_given():
    narrowed = quoted_schema(FRAMES, "paint it red")
    assert [frame["properties"]["transcript"] for frame in narrowed["anyOf"]] == [{"const": "paint it red"}] * 2


def test_a_slot_no_words_fill_keeps_its_own_values():
    """The frame stays: a misheard transcript must not move the answer to another intent."""
    assert slot_values(quoted_schema(FRAMES, "paint it red"))["call"] == FRAMES["anyOf"][1]["properties"]["name"]


def frame(transcript: str, intent: str, **slots) -> str:
    return json.dumps({"transcript": transcript, "intent": intent, **slots})


def test_an_answer_whose_slot_values_are_all_words_of_its_transcript_is_quoted_throughout():
    assert quoted_throughout(FRAMES, frame("please call anna lee", "call", name="anna lee"))


def test_an_answer_with_a_value_from_its_catalogue_is_not():
    assert not quoted_throughout(FRAMES, frame("please call anna", "call", name="mum"))


def test_the_constant_intent_need_not_be_quoted():
    assert quoted_throughout(FRAMES, frame("paint it red", "paint", colour="red"))


@pytest.mark.parametrize("text", ["not json", '{"intent": "call", "name": "mum"}', '{"transcript": 3}'])
def test_an_answer_without_its_transcript_is_not_quoted(text):
    assert not quoted_throughout(FRAMES, text)


def test_the_first_quoted_beam_is_kept_over_a_better_scored_unquoted_one():
    beams = [frame("paint it red", "call", name="mum"), frame("paint it red", "paint", colour="red")]
    assert first_quoted(FRAMES, beams) == beams[1]


def test_the_best_beam_is_kept_when_none_is_quoted():
    beams = [frame("paint it", "call", name="mum"), frame("paint it", "paint", colour="red")]
    assert first_quoted(FRAMES, beams) == beams[0]


# A transcript the untrained model can only write with these words, then a colour from a longer list; the tiny
# tokenizer spends a token on about every character.
SAID = "red|green|blue"
QUOTED_TOKENS = 64
QUOTED = {
    "type": "object", "additionalProperties": False, "required": ["transcript", "colour"],
    "properties": {"transcript": {"type": "string", "pattern": f"^(?:{SAID})(?: (?:{SAID})){{0,2}}$"},
                   "colour": {"type": "string", "pattern": f"^(?:{COLOURS})$"}},
    "x-guidance": {"whitespace_flexible": False},
    WORDS_FROM: "transcript",
}


def quotes_its_transcript(text: str) -> bool:
    answer = json.loads(text)
    return answer["colour"] in word_runs(answer["transcript"])


def quoted_answers(whisper_qwen, **options) -> list[str]:
    processor, model = whisper_qwen
    return transcribe_arrays(model, processor, make_clips(), max_new_tokens=QUOTED_TOKENS, **options)


def test_untrained_model_quotes_its_own_transcript(whisper_qwen):
    answers = quoted_answers(whisper_qwen, json_schema=QUOTED)
    assert all(map(quotes_its_transcript, answers)), answers


def test_without_the_keyword_the_same_model_does_not(whisper_qwen):
    """The contrast that makes the test above mean something."""
    answers = quoted_answers(whisper_qwen, json_schema={k: v for k, v in QUOTED.items() if k != WORDS_FROM})
    assert not all(map(quotes_its_transcript, answers)), answers


def test_beams_with_different_transcripts_each_quote_their_own(whisper_qwen):
    answers = quoted_answers(whisper_qwen, num_beams=3, json_schema=json.dumps(QUOTED))
    assert all(map(quotes_its_transcript, answers)), answers


def test_batched_quoted_answers_equal_one_by_one(whisper_qwen):
    batched, alone = batched_and_alone(*whisper_qwen, max_new_tokens=QUOTED_TOKENS, json_schema=QUOTED)
    assert batched == alone


# Words the untrained model writes both ways: on the fourth clip its best beam transcribes "rot" (no colour to
# quote: the colour comes from the list) and a later beam "red red" (quoted).
ROT_TRANSCRIPT = {"type": "string", "pattern": "^(?:rot|red)(?: (?:rot|red)){0,2}$"}
ROT = {**QUOTED, "properties": {**QUOTED["properties"], "transcript": ROT_TRANSCRIPT}}
BEAMS = {"max_new_tokens": QUOTED_TOKENS, "num_beams": 4}


def test_prefer_quoted_answers_each_clip_with_its_best_quoted_beam(whisper_qwen):
    processor, model = whisper_qwen
    clips = make_clips((0.55, 0.3, 0.8, 1.1), seed=3)
    beams = transcribe_arrays(model, processor, clips, json_schema=ROT, num_return_sequences=4, **BEAMS)
    chosen = transcribe_arrays(model, processor, clips, json_schema=ROT, prefer_quoted=True, **BEAMS)
    assert chosen == [first_quoted(ROT, candidates) for candidates in beams]
    assert chosen != [candidates[0] for candidates in beams]  # a clip whose best beam was not quoted


def test_batched_prefer_quoted_answers_equal_one_by_one(whisper_qwen):
    batched, alone = batched_and_alone(*whisper_qwen, json_schema=ROT, prefer_quoted=True, **BEAMS)
    assert batched == alone


def test_prefer_quoted_leaves_a_clip_without_quoting_its_best_beam(whisper_qwen):
    processor, model = whisper_qwen
    clips = make_clips((0.55, 1.1), seed=3)
    plain = {k: v for k, v in ROT.items() if k != WORDS_FROM}
    best = transcribe_arrays(model, processor, clips[1:], json_schema=plain, **BEAMS)
    chosen = transcribe_arrays(model, processor, clips, json_schema=[ROT, plain], prefer_quoted=True, **BEAMS)
    assert chosen[1:] == best


@pytest.mark.parametrize(("options", "message"), [
    ({"json_schema": ROT, "num_beams": 1}, "prefer_quoted chooses among a beam search's beams: it needs num_beams"),
    ({"json_schema": ROT, "num_beams": 4, "num_return_sequences": 2}, "give it or num_return_sequences, not both"),
    ({"json_schema": SCHEMA, "num_beams": 4}, "no clip has one"),  # held, but nothing quoted
    ({"num_beams": 4}, "no clip has one"),
])
def test_prefer_quoted_where_it_cannot_choose_is_a_clear_value_error(whisper_qwen, options, message):
    processor, model = whisper_qwen
    with pytest.raises(ValueError, match=message):
        transcribe_arrays(model, processor, make_clips((1.0,)), prefer_quoted=True, **options)


# Two frames that repeat a long field (a catalogue of 400 names), as the demo's SLU frames repeat an amount pattern.
NAMES = "|".join(f"name{i}" for i in range(400))
CATALOGUE = {"type": "string", "pattern": f"^(?:{NAMES}|red)$"}
REPEATED = {**FRAMES, "anyOf": [{**frame, "properties": {**frame["properties"], "name": CATALOGUE}}
                                for frame in FRAMES["anyOf"]]}


def test_a_long_field_several_frames_repeat_is_defined_once():
    shared = shared_fields(REPEATED)
    assert list(shared["$defs"].values()) == [CATALOGUE]
    assert [frame["properties"]["name"] for frame in shared["anyOf"]] == [{"$ref": "#/$defs/shared_0"}] * 2


def test_short_or_unrepeated_fields_stay_inline():
    assert shared_fields(FRAMES) == FRAMES


def test_a_quoted_schema_defines_the_repeated_catalogue_once():
    assert list(quoted_schema(REPEATED, "paint it blue")["$defs"].values()) == [CATALOGUE]


def test_answers_are_the_same_with_the_catalogue_defined_once_or_inline(whisper_qwen, monkeypatch):
    import speechlm.inference.structured as structured

    unquotable = {"type": "string", "pattern": "^(?:rot|reef)(?: (?:rot|reef)){0,2}$"}  # no name: the catalogue stays
    schema = {**REPEATED, "anyOf": [{**frame, "properties": {**frame["properties"], "transcript": unquotable}}
                                    for frame in REPEATED["anyOf"]]}
    options = {"json_schema": schema, "num_beams": 3}
    shared = quoted_answers(whisper_qwen, **options)
    assert not any(quoted_throughout(schema, answer) for answer in shared), shared  # names from the catalogue
    monkeypatch.setattr(structured, "SHARED_FIELD_CHARS", 10**9)
    assert quoted_answers(whisper_qwen, **options) == shared


# The transcript defined once and referred to (what a schema whose frames share a long transcript pattern does).
REFERRED = {**QUOTED, "properties": {**QUOTED["properties"], "transcript": {"$ref": "#/$defs/said"}},
            "$defs": {"said": QUOTED["properties"]["transcript"]}}


def test_untrained_model_quotes_a_transcript_defined_by_reference(whisper_qwen):
    answers = quoted_answers(whisper_qwen, json_schema=REFERRED)
    assert all(map(quotes_its_transcript, answers)), answers
    assert all(re.fullmatch(f"(?:{SAID})(?: (?:{SAID})){{0,2}}", json.loads(a)["transcript"]) for a in answers)


def test_a_quoted_schema_drops_the_definition_only_its_transcript_referred_to():
    assert "$defs" not in quoted_schema(REFERRED, "red green")


def test_a_quoted_schema_keeps_a_definition_something_else_still_refers_to():
    nested = {"type": "object", "properties": {"shade": {"$ref": "#/$defs/shade"}}}
    schema = {**REFERRED, "properties": {**REFERRED["properties"], "detail": nested},
              "$defs": {**REFERRED["$defs"], "shade": {"enum": ["light", "dark"]}}}
    assert quoted_schema(schema, "red green")["$defs"] == {"shade": {"enum": ["light", "dark"]}}


@pytest.mark.parametrize("schema", [
    {**REFERRED, "$defs": {"said": {"type": "integer"}}},  # refers to a number, not a string
    {**QUOTED, WORDS_FROM: "colour"},  # not the first property
    {**QUOTED, "required": ["colour"]},  # the transcript may be left out
    {**FRAMES, "anyOf": [FRAMES["anyOf"][0], {"type": "object", "properties": {"intent": {"const": "stop"}}}]},
])
def test_a_words_from_field_that_does_not_open_every_answer_is_refused(schema):
    with pytest.raises(ValueError, match=f"{WORDS_FROM} names .* must be the first property"):
        schema_grammar(schema)

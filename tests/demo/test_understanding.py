"""Understanding tasks rendered from the grammar (speechlm/demo/understanding.py)."""

from __future__ import annotations

import functools
import json
import re
from collections import Counter

import pytest

from speechlm.demo.grammar import Utterance, split_sentences, utterances
from speechlm.demo.understanding import (
    QA_TRANSCRIPT_INSTRUCTION,
    SLU_PROMPT,
    SLU_TRANSCRIPT_PROMPT,
    TRANSCRIBE_PROMPT,
    Example,
    answer_of,
    answer_pattern,
    cascade_prompt,
    examples,
    parse_tasks,
    qa_transcript_schema,
    question,
    slu_schema,
    slu_target,
    text_only_examples,
    training_examples,
    write_schemas,
)
from speechlm.inference.structured import WORDS_FROM, schema_grammar, word_runs
from tests.tiny_models import make_tokenizer

ALARM = Utterance("set an alarm for seven thirty tomorrow", "set_alarm",
                  (("time", "seven thirty"), ("date", "tomorrow")))
FLIGHT = Utterance("how far is paris from rome", "distance", (("city", "paris"), ("city_2", "rome")))
NO_SLOTS = Utterance("turn off all alarms", "turn_off_alarms", ())


def test_tasks_parse_and_always_keep_transcription():
    assert parse_tasks("transcribe, slu,qa") == ("transcribe", "slu", "qa")
    with pytest.raises(ValueError, match="translate"):
        parse_tasks("transcribe,translate")
    with pytest.raises(ValueError, match="must include 'transcribe'"):
        parse_tasks("slu")


def test_slu_target_is_json_with_the_intent_first_and_every_slot():
    target = json.loads(slu_target(ALARM))
    assert list(target) == ["intent", "time", "date"]
    assert target == {"intent": "set_alarm", "time": "seven thirty", "date": "tomorrow"}


def test_question_asks_about_a_slot_and_its_answer_is_that_value():
    asked, answer = question(FLIGHT)
    assert (asked, answer) in {("What city does the speaker mention?", "paris"),
                               ("What second city does the speaker mention?", "rome")}
    assert question(NO_SLOTS) is None


def test_the_answer_pattern_matches_every_answer_the_grammar_teaches():
    from speechlm.demo.grammar import _utterance_stream

    stream = _utterance_stream(0)
    drawn = [utterance for utterance in (next(stream) for _ in range(3000)) if utterance.slots]
    assert all(re.fullmatch(answer_pattern(u), question(u)[1]) for u in drawn)


def test_the_answer_pattern_refuses_a_value_of_another_slot():
    assert re.fullmatch(answer_pattern(FLIGHT), "rome") and not re.fullmatch(answer_pattern(FLIGHT), "seven thirty")
    assert answer_pattern(NO_SLOTS) is None


def test_a_clip_without_a_known_meaning_is_only_transcribed():
    assert [e.task for e in examples("press one for sales", None, ("transcribe", "slu", "qa"))] == ["transcribe"]


def test_training_clip_gives_its_transcription_and_one_understanding_example():
    pairs = training_examples(ALARM.text, ALARM, ("transcribe", "slu", "qa"))
    assert [e.task for e in pairs][0] == "transcribe" and len(pairs) == 2
    assert pairs[0].prompt == TRANSCRIBE_PROMPT and pairs[0].target == ALARM.text
    assert pairs[1].task in ("slu", "qa")
    only_slu = training_examples(ALARM.text, ALARM, ("transcribe", "slu"))
    assert [(e.task, e.prompt) for e in only_slu] == [("transcribe", TRANSCRIBE_PROMPT), ("slu", SLU_PROMPT)]


def test_cascade_prompt_holds_the_task_examples_then_the_query():
    shots = [(ALARM.text, e) for e in examples(ALARM.text, ALARM, ("transcribe", "slu", "qa"))]
    prompt = cascade_prompt("slu", SLU_PROMPT, "wake me up at six", shots)
    assert prompt.endswith(f"Transcript: wake me up at six\n{SLU_PROMPT}")
    assert f"Transcript: {ALARM.text}\n{SLU_PROMPT} {slu_target(ALARM)}" in prompt
    assert "What" not in prompt and TRANSCRIBE_PROMPT not in prompt


def schema_matcher(values: bool = False, transcript: bool = False, schema: dict | None = None):
    """`text` -> whether decoding under `schema` (by default `slu_schema(values=..., transcript=...)`) may produce it
    (llguidance checks bytes: any tokenization does)."""
    import llguidance.hf
    from llguidance import LLMatcher

    tokenizer = make_tokenizer()
    schema = schema or slu_schema(values=values, transcript=transcript)
    matcher = LLMatcher(llguidance.hf.from_tokenizer(tokenizer), schema_grammar(schema))

    def accepts(text: str) -> bool:
        matcher.reset()
        return matcher.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]) and matcher.is_accepting()

    return accepts


@pytest.fixture(scope="module", params=[False, True], ids=["ontology", "catalogue"])
def slu_matcher(request):
    return schema_matcher(request.param)


def test_the_slu_schema_admits_an_answer_of_every_frame_the_grammar_teaches(slu_matcher):
    from speechlm.demo.grammar import _utterance_stream

    frames, stream = {}, _utterance_stream(0)
    for _ in range(20000):
        utterance = next(stream)
        frames.setdefault((utterance.intent, tuple(key for key, _ in utterance.slots)), []).append(utterance)
    assert len(frames) == len(slu_schema()["anyOf"])  # every frame was drawn
    answers = [slu_target(utterance) for drawn in frames.values() for utterance in drawn[:3]]
    assert all(slu_matcher(answer) for answer in answers)


@pytest.mark.parametrize("answer", [
    '{"intent": "set_alarm_clock", "time": "seven"}',  # an intent the domain does not have
    '{"intent": "set_alarm", "city": "paris"}',  # a slot that intent does not take
    '{"time": "seven", "intent": "set_alarm"}',  # the intent first, as trained
])
def test_the_slu_schema_refuses_what_the_domain_cannot_mean(slu_matcher, answer):
    assert not slu_matcher(answer)


def test_the_catalogue_schema_also_refuses_a_value_the_slot_cannot_take():
    answer = '{"intent": "open_covering", "covering": "court", "room": "dining room"}'  # "court": not a covering
    assert schema_matcher(values=False)(answer) and not schema_matcher(values=True)(answer)


def test_a_model_that_learned_slu_gets_its_schema_with_the_catalogue_beside_it(tmp_path):
    # The file holds answers as the demo's evaluation held them: `speechlm evaluate --task-schema` reproduces it.
    assert write_schemas(tmp_path, ("transcribe", "qa")) == [] and not list(tmp_path.iterdir())
    (path,) = write_schemas(tmp_path, ("transcribe", "slu"))
    assert json.loads(path.read_text()) == slu_schema(values=True)


def test_the_transcript_first_frame_writes_the_words_then_the_intent_and_slots():
    (example,) = [e for e in examples(ALARM.text, ALARM, ("transcribe", "slu_transcript")) if e.task != "transcribe"]
    assert example.task == "slu_transcript" and example.prompt == SLU_TRANSCRIPT_PROMPT
    assert list(json.loads(example.target).items()) == [("transcript", ALARM.text), ("intent", "set_alarm"),
                                                        *ALARM.slots]


def test_the_transcript_first_schema_admits_the_trained_answer_and_needs_the_transcript_first():
    accepts = schema_matcher(values=False, transcript=True)
    assert accepts(slu_target(ALARM, transcript=True)) and accepts(slu_target(FLIGHT, transcript=True))
    assert not accepts(slu_target(ALARM))  # no transcript
    assert not accepts('{"intent": "set_alarm", "transcript": "x", "time": "seven thirty", "date": "tomorrow"}')


def test_a_model_that_learned_both_slu_forms_gets_both_schemas(tmp_path):
    paths = write_schemas(tmp_path, ("transcribe", "slu", "slu_transcript"))
    assert [p.name for p in paths] == ["slu_schema.json", "slu_transcript_schema.json"]
    assert json.loads(paths[1].read_text()) == slu_schema(values=True, transcript=True, quoted=True)


def qa_transcript_example(utterance):
    (example,) = [e for e in examples(utterance.text, utterance, ("transcribe", "qa_transcript"))
                  if e.task != "transcribe"]
    return example


def test_every_slot_value_the_grammar_says_is_words_of_its_sentence():
    """What lets a transcript-first answer quote its slot values from the words it has just written."""
    from speechlm.demo.grammar import _utterance_stream

    stream = _utterance_stream(0)
    drawn = [next(stream) for _ in range(20000)]
    assert all(value in word_runs(utterance.text) for utterance in drawn for _, value in utterance.slots)


@pytest.mark.parametrize("written", [f"{ALARM.text} ", f"{ALARM.text}.", ALARM.text.capitalize(),
                                     ALARM.text.replace(" ", "  ", 1)],
                         ids=["trailing space", "full stop", "capital", "double space"])
def test_the_transcript_field_refuses_the_words_in_another_form_than_training_wrote(written):
    # Free, beams spent themselves on the same words with a space or a full stop after them.
    accepts, answer = schema_matcher(values=False, transcript=True), json.loads(slu_target(ALARM, transcript=True))
    assert accepts(json.dumps(answer)) and not accepts(json.dumps({**answer, "transcript": written}))


def test_only_transcript_first_schemas_can_quote_their_slot_values():
    assert slu_schema(values=True, transcript=True, quoted=True)[WORDS_FROM] == "transcript"
    assert qa_transcript_schema(quoted=True)[WORDS_FROM] == "transcript"
    assert WORDS_FROM not in slu_schema(values=True, quoted=True)  # no transcript to quote


def test_the_transcript_first_question_is_answered_after_the_words():
    example, (asked, answer) = qa_transcript_example(FLIGHT), question(FLIGHT)
    assert example.task == "qa_transcript" and example.prompt == f"{asked} {QA_TRANSCRIPT_INSTRUCTION}"
    assert list(json.loads(example.target).items()) == [("transcript", FLIGHT.text), ("answer", answer)]


def test_a_sentence_without_slots_asks_no_transcript_first_question():
    assert [e.task for e in examples(NO_SLOTS.text, NO_SLOTS, ("transcribe", "qa_transcript"))] == ["transcribe"]


def test_a_transcript_first_answer_is_scored_by_its_answer_field():
    assert answer_of("qa_transcript", qa_transcript_example(ALARM).target) == question(ALARM)[1]
    assert answer_of("qa_transcript", "seven thirty") == ""  # not the JSON it was taught: no answer
    assert answer_of("qa", "seven thirty") == "seven thirty"


def test_the_transcript_first_question_schema_holds_the_answer_to_its_slots_values():
    accepts = schema_matcher(schema=qa_transcript_schema(answer_pattern(FLIGHT)))
    assert accepts(qa_transcript_example(FLIGHT).target)
    assert not accepts(json.dumps({"transcript": FLIGHT.text, "answer": "seven thirty"}))  # a time, not a city
    assert not accepts(json.dumps({"answer": "paris", "transcript": FLIGHT.text}))  # the words come first


def test_a_model_that_learned_transcript_first_questions_gets_their_schema(tmp_path):
    (path,) = write_schemas(tmp_path, ("transcribe", "qa", "qa_transcript"))
    assert path.name == "qa_transcript_schema.json"
    assert json.loads(path.read_text()) == qa_transcript_schema(quoted=True)


# ------------------------------------------------------------------------------- transcripts held to the sentences
@pytest.fixture(scope="module")
def sentence_matcher():
    return schema_matcher(schema=slu_schema(values=True, transcript=True, quoted=True, sentences=True))


def test_held_to_the_sentences_the_slu_schema_admits_every_held_out_answer(sentence_matcher):
    meanings = utterances(split_sentences(10, 100, seed=0)[1], seed=0)
    assert len(meanings) == 100
    assert all(sentence_matcher(slu_target(u, transcript=True)) for u in meanings.values())


def test_held_to_the_sentences_the_slu_schema_refuses_a_transcript_the_domain_cannot_say(sentence_matcher):
    misheard = Utterance("set an alarm for seven thirteen tomorrow", "set_alarm", ALARM.slots)
    assert not sentence_matcher(slu_target(misheard, transcript=True))
    assert schema_matcher(values=True, transcript=True)(slu_target(misheard, transcript=True))  # free transcript


def test_the_sentences_are_defined_once_for_every_frame():
    schema = slu_schema(values=True, transcript=True, quoted=True, sentences=True)
    assert {frame["properties"]["transcript"]["$ref"] for frame in schema["anyOf"]} == {"#/$defs/sentence"}
    assert list(schema["$defs"]) == ["sentence"]


def test_held_to_the_sentences_the_question_schema_admits_the_answer_and_refuses_other_words():
    accepts = schema_matcher(schema=qa_transcript_schema(answer_pattern(FLIGHT), quoted=True, sentences=True))
    assert accepts(qa_transcript_example(FLIGHT).target)
    assert not accepts(json.dumps({"transcript": FLIGHT.text + " now", "answer": question(FLIGHT)[1]}))


def _question_examples(texts: list[str], meanings: dict[str, Utterance],
                       training: bool) -> list[tuple[Utterance, Example]]:
    """(utterance, question example) of each sentence: the one its training clip teaches, or the one its held-out
    clip is asked."""
    tasks = ["transcribe", "slu_transcript", "qa_transcript"]
    pick = training_examples if training else examples
    return [(meanings[text], example) for text in texts for example in pick(text, meanings[text], tasks)
            if example.task == "qa_transcript"]


@functools.cache
def _demo_split() -> tuple[list[str], list[str], dict[str, Utterance]]:
    train, test = split_sentences(9000, 200, seed=0)
    return train, test, utterances(train + test, seed=0)


def test_training_questions_on_two_slot_sentences_ask_about_either_slot():
    train, _, meanings = _demo_split()
    asked = Counter()
    for utterance, example in _question_examples(train, meanings, training=True):
        values = [value for _, value in utterance.slots]
        answer = json.loads(example.target)["answer"]
        if len(values) == 2 and values.count(answer) == 1:
            asked[values.index(answer)] += 1
    assert min(asked[0], asked[1]) > 0.25 * (asked[0] + asked[1])


def test_every_kind_of_held_out_question_is_asked_in_training():
    """Each (intent, question) a held-out clip is asked, some training clip is taught."""
    train, test, meanings = _demo_split()
    taught = {(u.intent, example.prompt) for u, example in _question_examples(train, meanings, training=True)}
    held_out = {(u.intent, example.prompt) for u, example in _question_examples(test, meanings, training=False)}
    assert held_out and not held_out - taught


def test_text_only_examples_are_what_a_clip_of_the_same_sentence_would_teach():
    from speechlm.demo.grammar import text_only_utterances

    tasks = ["transcribe", "slu_transcript", "qa_transcript"]
    for example, utterance in zip(text_only_examples(200, tasks), text_only_utterances(200), strict=True):
        (taught,) = training_examples(utterance.text, utterance, tasks)[1:]
        assert example == {"prompt": taught.prompt, "text": taught.target, "transcript": utterance.text,
                           "task": taught.task}


def test_text_only_examples_alternate_between_the_understanding_tasks():
    found = text_only_examples(200, ["transcribe", "slu_transcript", "qa_transcript"])
    assert {e["task"] for e in found} == {"slu_transcript", "qa_transcript"}


def test_text_only_examples_need_an_understanding_task():
    with pytest.raises(ValueError, match="--tasks has none beside transcribe"):
        text_only_examples(10, ["transcribe"])

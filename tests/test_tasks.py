"""Per-task scorers (`speechlm.tasks`) on hand-checked cases: JSON understanding, short answers, kind inference."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from speechlm.evaluation import word_error_rate
from speechlm.tasks import (
    UNTAGGED,
    headline_metrics,
    infer_kind,
    parse_json_object,
    parse_task_metrics,
    resolve_kinds,
    score_answer,
    score_json,
    score_records,
    score_task,
    task_rows,
    transcription_scores,
)

ALARM = '{"intent": "set_alarm", "time": "7:30"}'


# ------------------------------------------------------------------------------------------------------------ JSON
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ALARM, {"intent": "set_alarm", "time": "7:30"}),
        (f"  \n{ALARM}\n ", {"intent": "set_alarm", "time": "7:30"}),
        (f"```json\n{ALARM}\n```", {"intent": "set_alarm", "time": "7:30"}),
        (f"```\n{ALARM}\n```", {"intent": "set_alarm", "time": "7:30"}),
        (f"Sure! {ALARM}", None),  # prose around the object
        ('{"intent": "set_alarm"', None),  # truncated
        ('["set_alarm"]', None),  # JSON, but not an object
        ('"set_alarm"', None),
        ("", None),
    ],
)
def test_parse_json_object(text, expected):
    assert parse_json_object(text) == expected


def test_valid_json_rate_counts_every_hypothesis():
    scores = score_json([ALARM] * 4, [ALARM, f"```json\n{ALARM}\n```", "set alarm at 7:30", "[]"])
    assert scores["valid_json"] == 0.5 and scores["n_utterances"] == 4


def test_a_transcript_the_frame_carries_is_not_a_slot():
    reference = '{"transcript": "wake me at seven thirty", "intent": "set_alarm", "time": "7:30"}'
    hypothesis = '{"transcript": "wake me at seven", "intent": "set_alarm", "time": "7:30"}'
    scores = score_json([reference], [hypothesis])
    assert scores["slot_f1"] == 1.0 and scores["frame_accuracy"] == 1.0 and scores["slot_reference"] == 1


def test_right_intent_wrong_slot_value():
    scores = score_json([ALARM], ['{"intent": "set_alarm", "time": "8:30"}'])
    assert scores["intent_accuracy"] == 1.0
    assert (scores["slot_precision"], scores["slot_recall"], scores["slot_f1"]) == (0.0, 0.0, 0.0)
    assert scores["frame_accuracy"] == 0.0


def test_partial_slot_overlap_gives_exact_micro_precision_recall_f1():
    references = ['{"intent": "book_flight", "from": "Paris", "to": "Rome", "date": "monday"}',
                  '{"intent": "call", "contact": "mom"}']  # fmt: skip
    hypotheses = ['{"intent": "book_flight", "from": "paris", "to": "Milan"}',  # 1 hit, 1 wrong, 1 missing
                  '{"intent": "call", "contact": "Mom!", "time": "now"}']  # 1 hit (normalised), 1 extra
    scores = score_json(references, hypotheses)
    # hits 2, predicted 4, reference 4
    assert (scores["slot_hits"], scores["slot_predicted"], scores["slot_reference"]) == (2, 4, 4)
    assert scores["slot_precision"] == 0.5 and scores["slot_recall"] == 0.5 and scores["slot_f1"] == 0.5
    assert scores["intent_accuracy"] == 1.0 and scores["frame_accuracy"] == 0.0


def test_micro_average_weights_slots_not_utterances():
    references = ['{"intent": "a", "x": "1", "y": "2", "z": "3"}', '{"intent": "b", "w": "4"}']
    hypotheses = ['{"intent": "a", "x": "1", "y": "2", "z": "3"}', '{"intent": "b"}']
    scores = score_json(references, hypotheses)
    assert scores["slot_precision"] == 1.0 and scores["slot_recall"] == 0.75
    assert scores["slot_f1"] == pytest.approx(2 * 0.75 / 1.75)


def test_invalid_hypothesis_is_no_intent_and_no_slots():
    scores = score_json([ALARM, ALARM], [ALARM, "set_alarm 7:30"])
    assert scores["valid_json"] == 0.5 and scores["intent_accuracy"] == 0.5
    assert scores["slot_precision"] == 1.0 and scores["slot_recall"] == 0.5  # never skipped: costs recall


def test_intents_are_compared_after_normalisation():
    assert score_json([ALARM], ['{"intent": "Set_Alarm", "time": "7:30"}'])["intent_accuracy"] == 1.0
    assert score_json([ALARM], ['{"intent": "set_timer", "time": "7:30"}'])["intent_accuracy"] == 0.0


def test_number_equals_its_written_form():
    references = ['{"intent": "call", "digits": 42, "price": 7.5, "count": 3}']
    hypotheses = ['{"intent": "call", "digits": "42", "price": "7.5", "count": 3.0}']
    assert score_json(references, hypotheses)["slot_f1"] == 1.0
    assert score_json(['{"digits": 42}'], ['{"digits": "forty two"}'])["slot_f1"] == 0.0  # not spelled out


def test_list_values_are_one_slot_per_item_in_any_order():
    scores = score_json(['{"intent": "msg", "to": ["Ann", "Bob"]}'], ['{"intent": "msg", "to": ["bob", "Cy"]}'])
    assert (scores["slot_hits"], scores["slot_predicted"], scores["slot_reference"]) == (1, 2, 2)


def test_nested_objects_flatten_to_dotted_keys_and_nulls_are_absent():
    references = ['{"intent": "alarm", "time": {"hour": 7, "minute": 30}, "label": null}']
    rows = task_rows("json", ["u"], references, ['{"intent": "alarm", "time": {"hour": 7}, "label": ""}'])
    assert rows[0]["missing_slots"] == ["time.minute=30"] and rows[0]["extra_slots"] == []


def test_no_slots_on_either_side_is_perfect():
    scores = score_json(['{"intent": "stop"}'], ['{"intent": "stop"}'])
    assert scores["slot_precision"] == scores["slot_recall"] == scores["slot_f1"] == 1.0
    assert scores["frame_accuracy"] == 1.0


def test_reference_that_is_not_json_is_an_error():
    with pytest.raises(ValueError, match=r"references\[1\] is not a JSON object"):
        score_json([ALARM, "seven thirty"], [ALARM, ALARM])


def test_json_rows_name_missing_and_extra_slots():
    rows = task_rows("json", ["a", "b"], [ALARM, ALARM], ['{"intent": "set_alarm", "time": "8:30"}', "oops"])
    assert rows[0]["missing_slots"] == ["time=7 30"] and rows[0]["extra_slots"] == ["time=8 30"]
    assert rows[0]["intent_correct"] and not rows[1]["valid_json"] and not rows[1]["intent_correct"]
    assert rows[1]["id"] == "b" and rows[1]["hyp"] == "oops"


# --------------------------------------------------------------------------------------------------------- answers
def test_exact_match_after_normalisation_and_articles():
    scores = score_answer(["seven thirty", "Paris", "the red one"], ["Seven thirty.", "the Paris", "red"])
    assert scores["exact_match"] == pytest.approx(2 / 3) and scores["n_exact"] == 2


def test_token_f1_is_squad_style():
    # reference 3 tokens, hypothesis 2 tokens, 2 in common: P = 1, R = 2/3, F1 = 0.8
    assert score_answer(["flight ba two"], ["flight two"])["token_f1"] == pytest.approx(0.8)
    assert score_answer(["yes"], ["no"])["token_f1"] == 0.0
    assert score_answer(["a"], ["the"])["token_f1"] == 1.0  # both empty once articles go


def test_answer_without_normalisation_compares_raw_tokens():
    assert score_answer(["Paris"], ["paris"], normalize=False)["exact_match"] == 0.0


# -------------------------------------------------------------------------------------------------------- dispatch
def test_transcription_kind_is_word_error_rate():
    refs, hyps = ["call mom now", "play jazz"], ["call mum now", "play jazz"]
    assert score_task("transcription", refs, hyps) == word_error_rate(refs, hyps)


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown task metric kind 'bleu'"):
        score_task("bleu", ["a"], ["a"])


@pytest.mark.parametrize(
    ("task", "references", "kind"),
    [
        (None, ['{"intent": "x"}'], "transcription"),
        ("ASR", ["hello"], "transcription"),
        ("transcribe", ["hello"], "transcription"),
        ("slu", [ALARM, '{"intent": "stop"}'], "json"),
        ("slu", [ALARM, "stop"], "answer"),  # not every reference is an object
        ("qa", ["seven thirty"], "answer"),
    ],
)
def test_infer_kind(task, references, kind):
    assert infer_kind(task, references) == kind


def test_explicit_kind_wins_over_inference():
    records = [{"task": "qa", "text": "seven"}, {"task": "slu", "text": ALARM}, {"task": None, "text": "hi"}]
    assert resolve_kinds(records, {"qa": "transcription"}) == {"qa": "transcription", "slu": "json",
                                                               UNTAGGED: "transcription"}


def test_parse_task_metrics():
    assert parse_task_metrics(["slu=json", " qa = answer "]) == {"slu": "json", "qa": "answer"}
    with pytest.raises(ValueError, match="TASK=KIND"):
        parse_task_metrics(["slu"])
    with pytest.raises(ValueError, match="unknown task metric kind"):
        parse_task_metrics(["slu=bleu"])


MIXED = [
    {"id": "t1", "task": "transcribe", "text": "call mom"},
    {"id": "s1", "task": "slu", "text": ALARM},
    {"id": "q1", "task": "qa", "text": "seven thirty"},
    {"id": "t2", "task": "transcribe", "text": "play some jazz"},
]
MIXED_HYPOTHESES = ["call mum", '{"intent": "set_alarm", "time": "7:30"}', "seven", "play some jazz"]


def test_score_records_groups_by_task_with_their_kinds():
    scores = score_records(MIXED, MIXED_HYPOTHESES)
    assert {task: values["kind"] for task, values in scores.items()} == {
        "transcribe": "transcription", "slu": "json", "qa": "answer"}  # fmt: skip
    assert scores["transcribe"]["wer"] == pytest.approx(1 / 5) and scores["slu"]["slot_f1"] == 1.0
    assert scores["qa"]["token_f1"] == pytest.approx(2 / 3)


def test_overall_wer_covers_transcription_rows_only():
    kinds = resolve_kinds(MIXED)
    overall = transcription_scores(MIXED, MIXED_HYPOTHESES, kinds)
    assert overall == word_error_rate(["call mom", "play some jazz"], ["call mum", "play some jazz"])
    assert transcription_scores(MIXED[1:3], MIXED_HYPOTHESES[1:3], resolve_kinds(MIXED[1:3])) is None


def test_headline_metrics_names():
    scores = score_records(MIXED, MIXED_HYPOTHESES)
    overall = transcription_scores(MIXED, MIXED_HYPOTHESES, resolve_kinds(MIXED))
    metrics = headline_metrics(scores, overall)
    assert set(metrics) == {"eval_transcribe_wer", "eval_transcribe_cer", "eval_slu_valid_json",
                            "eval_slu_intent_accuracy", "eval_slu_slot_precision", "eval_slu_slot_recall",
                            "eval_slu_slot_f1", "eval_qa_exact_match", "eval_qa_token_f1", "eval_wer", "eval_cer"}
    single = score_records(MIXED[1:2], MIXED_HYPOTHESES[1:2])
    assert set(headline_metrics(single)) == {"eval_valid_json", "eval_intent_accuracy", "eval_slot_precision",
                                             "eval_slot_recall", "eval_slot_f1"}


def test_rows_are_json_serialisable():
    rows = task_rows("answer", ["q"], ["seven thirty"], ["seven"])
    assert json.loads(json.dumps(rows)) == rows and rows[0]["exact_match"] is False
    assert not math.isnan(rows[0]["token_f1"])


def test_module_does_not_import_torch():
    # speechlm/__init__ pulls in transformers, so load the two modules under a bare package of their own.
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, types\n"
        f"package = types.ModuleType('speechlm'); package.__path__ = [{str(root / 'speechlm')!r}]\n"
        "sys.modules['speechlm'] = package\n"
        "import speechlm.tasks\n"
        "heavy = [m for m in ('torch', 'transformers', 'jiwer') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_json_kind_for_non_json_references_fails_before_scoring():
    records = [{"task": "qa", "text": "seven", "location": "eval.jsonl:3"}]
    with pytest.raises(ValueError, match="eval.jsonl:3: task 'qa' is scored as json"):
        resolve_kinds(records, {"qa": "json"})

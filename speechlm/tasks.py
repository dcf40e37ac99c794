"""Per-task metrics for audio understanding: each task of a manifest is scored by a metric *kind*.

Kinds (`KINDS`), each a pure scorer over paired reference/hypothesis strings (`score_task`) with one inspectable row
per utterance (`task_rows`):

- `transcription`: WER/CER (`speechlm.evaluation.word_error_rate`).
- `json` (spoken-language understanding, e.g. `{"intent": "set_alarm", "time": "7:30"}`): `valid_json` (share of
  hypotheses that are a JSON object), `intent_accuracy`, micro-averaged `slot_precision` / `slot_recall` / `slot_f1`
  over the (key, value) pairs other than `"intent"` (and `"transcript"`: the words a frame may carry along, not a
  slot), and `frame_accuracy` (intent and every slot right).
- `answer` (short answers to questions about the audio): `exact_match` and SQuAD-style `token_f1`.

A task's kind is explicit (`task_metrics={"slu": "json"}`, config `evaluation.task_metrics`, CLI
`--task-metric slu=json`) or inferred (`infer_kind`): no task, or a task named transcribe/transcription/asr, is
transcription; a task whose references are all JSON objects is json; anything else is answer.

Import-light like `speechlm.evaluation` (no torch): the demo and the server may score without loading a model.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .evaluation.metrics import as_list, per_utterance_rows, word_error_rate
from .evaluation.normalizers import normalize_text

__all__ = [
    "HEADLINE",
    "KINDS",
    "NOT_SLOTS",
    "TRANSCRIPTION_TASKS",
    "UNTAGGED",
    "group_by_task",
    "headline_metrics",
    "infer_kind",
    "parse_json_object",
    "parse_task_metrics",
    "pooled_loss",
    "resolve_kinds",
    "score_answer",
    "score_json",
    "score_records",
    "score_task",
    "task_rows",
    "transcription_scores",
]

KINDS = ("transcription", "json", "answer")
TRANSCRIPTION_TASKS = frozenset({"transcribe", "transcription", "asr"})
# The group name of records without a `task` when a manifest mixes tagged and untagged rows (also in metric keys).
UNTAGGED = "untagged"
# Keys of a JSON frame that are not slots: the intent, and the words a frame may carry along.
NOT_SLOTS = frozenset({"intent", "transcript"})
# What training logs per task (the full dicts, with counts, go to `speechlm evaluate`'s metrics.json).
HEADLINE = {
    "transcription": ("wer", "cer"),
    "json": ("valid_json", "intent_accuracy", "slot_precision", "slot_recall", "slot_f1"),
    "answer": ("exact_match", "token_f1"),
}

Normalize = bool | Callable[[str], str]


def _cleaner(normalize: Normalize) -> Callable[[str], str]:
    if callable(normalize):
        return normalize
    return normalize_text if normalize else (lambda text: " ".join(text.split()))


def _pair(references, hypotheses) -> tuple[list[str], list[str]]:
    references, hypotheses = as_list(references, "references"), as_list(hypotheses, "hypotheses")
    if len(references) != len(hypotheses):
        raise ValueError(f"got {len(references)} references but {len(hypotheses)} hypotheses; they must pair up")
    return references, hypotheses


def _ratio(part: float, whole: int) -> float:
    return part / whole if whole else math.nan


# ---------------------------------------------------------------------------------------------------------- json
_FENCE = re.compile(r"\A```[A-Za-z]*[ \t]*\n?(.*?)\n?```\Z", re.DOTALL)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in `text`, or None when there is none.

    Surrounding whitespace and one enclosing Markdown code fence (```` ```json ... ``` ````) are tolerated, since
    chat-tuned decoders wrap JSON in fences out of habit and any consumer strips them as easily; anything else
    around the object (prose, a second object), or a JSON value that is not an object, is not valid.
    """
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _value_strings(value: Any, clean: Callable[[str], str]) -> list[str]:
    """A slot value as comparable strings: a number equals its written form (7 == "7", 7.0 == "7", 7.5 == "7.5"),
    booleans are "true"/"false", a list is one value per item (a multi-valued slot), null and values that clean to
    nothing are no value at all."""
    if value is None:
        return []
    if isinstance(value, list):
        return [text for item in value for text in _value_strings(item, clean)]
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    else:
        text = str(value)
    text = clean(text)
    return [text] if text else []


def _frame(value: dict[str, Any] | None, clean: Callable[[str], str]) -> tuple[str | None, Counter]:
    """(intent, multiset of (key, value) slots); nested objects flatten to dotted keys ({"a": {"b": 1}} -> a.b=1)."""
    if value is None:
        return None, Counter()
    intent = _value_strings(value.get("intent"), clean)
    slots: Counter = Counter()

    def add(prefix: str, mapping: Mapping[str, Any]) -> None:
        for key, item in mapping.items():
            name = f"{prefix}{key}"
            if isinstance(item, dict):
                add(f"{name}.", item)
            else:
                slots.update((name, text) for text in _value_strings(item, clean))

    add("", {key: item for key, item in value.items() if key not in NOT_SLOTS})
    return (" ".join(intent) if intent else None), slots


def _json_row(reference: str, hypothesis: str, clean: Callable[[str], str], index: int) -> dict[str, Any]:
    parsed_reference = parse_json_object(reference)
    if parsed_reference is None:
        raise ValueError(f"references[{index}] is not a JSON object, so it cannot be scored as json: {reference!r}")
    parsed = parse_json_object(hypothesis)
    ref_intent, ref_slots = _frame(parsed_reference, clean)
    hyp_intent, hyp_slots = _frame(parsed, clean)
    hits = ref_slots & hyp_slots
    intent_correct = ref_intent is not None and hyp_intent == ref_intent
    return {
        "valid_json": parsed is not None,
        "has_intent": ref_intent is not None,
        "intent_correct": intent_correct,
        "slot_hits": sum(hits.values()),
        "slot_predicted": sum(hyp_slots.values()),
        "slot_reference": sum(ref_slots.values()),
        "frame_correct": hyp_intent == ref_intent and hyp_slots == ref_slots,
        "missing_slots": [f"{key}={value}" for key, value in sorted((ref_slots - hyp_slots).elements())],
        "extra_slots": [f"{key}={value}" for key, value in sorted((hyp_slots - ref_slots).elements())],
    }


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def score_json(references: Sequence[str], hypotheses: Sequence[str], normalize: Normalize = True) -> dict[str, Any]:
    """Spoken-language-understanding scores of JSON hypotheses against JSON references (every reference must be a
    JSON object; a ValueError names the first that is not).

    A hypothesis that is not a JSON object (`parse_json_object`) counts as no intent and no slots: it is never
    skipped, so invalid output costs recall and intent accuracy. Intents and slot values are compared after
    `normalize` (the project's `normalize_text` by default); keys are compared as written. Slots are micro-averaged
    over the corpus: precision = hits / predicted pairs, recall = hits / reference pairs, where a side with no pairs
    at all scores 1.0 when the other has none either, else 0.0. `intent_accuracy` counts only references that have
    an intent (NaN when none does).
    """
    references, hypotheses = _pair(references, hypotheses)
    clean = _cleaner(normalize)
    rows = [_json_row(ref, hyp, clean, i) for i, (ref, hyp) in enumerate(zip(references, hypotheses))]
    hits = sum(row["slot_hits"] for row in rows)
    predicted = sum(row["slot_predicted"] for row in rows)
    reference = sum(row["slot_reference"] for row in rows)
    precision = hits / predicted if predicted else float(reference == 0)
    recall = hits / reference if reference else float(predicted == 0)
    with_intent = sum(row["has_intent"] for row in rows)
    return {
        "valid_json": _ratio(sum(row["valid_json"] for row in rows), len(rows)),
        "intent_accuracy": _ratio(sum(row["intent_correct"] for row in rows), with_intent),
        "slot_precision": precision,
        "slot_recall": recall,
        "slot_f1": _f1(precision, recall),
        "frame_accuracy": _ratio(sum(row["frame_correct"] for row in rows), len(rows)),
        "slot_hits": hits,
        "slot_predicted": predicted,
        "slot_reference": reference,
        "n_utterances": len(rows),
    }


# -------------------------------------------------------------------------------------------------------- answers
_ARTICLES = frozenset({"a", "an", "the"})


def _answer_tokens(text: str, clean: Callable[[str], str], normalize: Normalize) -> list[str]:
    # SQuAD's answer normalisation drops articles ("the seven thirty" == "seven thirty"); only when normalising.
    tokens = clean(text).split()
    return [token for token in tokens if token not in _ARTICLES] if normalize else tokens


def _token_f1(reference: list[str], hypothesis: list[str]) -> float:
    if not reference or not hypothesis:
        return float(reference == hypothesis)
    common = sum((Counter(reference) & Counter(hypothesis)).values())
    if not common:
        return 0.0
    return _f1(common / len(hypothesis), common / len(reference))


def _answer_row(reference: str, hypothesis: str, clean: Callable[[str], str], normalize: Normalize) -> dict:
    ref, hyp = _answer_tokens(reference, clean, normalize), _answer_tokens(hypothesis, clean, normalize)
    return {"exact_match": ref == hyp, "token_f1": _token_f1(ref, hyp)}


def score_answer(references: Sequence[str], hypotheses: Sequence[str], normalize: Normalize = True) -> dict[str, Any]:
    """Short-answer scores, SQuAD-style: `exact_match` (share of answers equal to their reference after
    normalisation) and `token_f1` (mean over utterances of the bag-of-tokens F1; 1.0 when both are empty).

    Normalisation is `normalize_text` plus SQuAD's removal of the articles a/an/the; `normalize=False` compares
    whitespace-separated tokens as written. One reference per question.
    """
    references, hypotheses = _pair(references, hypotheses)
    clean = _cleaner(normalize)
    rows = [_answer_row(ref, hyp, clean, normalize) for ref, hyp in zip(references, hypotheses)]
    return {
        "exact_match": _ratio(sum(row["exact_match"] for row in rows), len(rows)),
        "token_f1": _ratio(sum(row["token_f1"] for row in rows), len(rows)),
        "n_exact": sum(row["exact_match"] for row in rows),
        "n_utterances": len(rows),
    }


# ------------------------------------------------------------------------------------------------------ dispatch
def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown task metric kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def score_task(kind: str, references: Sequence[str], hypotheses: Sequence[str],
               normalize: Normalize = True) -> dict[str, Any]:
    """Corpus metrics of one task by its metric `kind` ("transcription", "json" or "answer"): see the module doc.

    `normalize` is True (`normalize_text`), False (whitespace only) or any `str -> str` function.
    """
    _check_kind(kind)
    if kind == "transcription":
        return word_error_rate(references, hypotheses, normalize=normalize)
    scorer = score_json if kind == "json" else score_answer
    return scorer(references, hypotheses, normalize=normalize)


def task_rows(kind: str, ids: Sequence[Any], references: Sequence[str], hypotheses: Sequence[str],
              normalize: Normalize = True) -> list[dict[str, Any]]:
    """One row per utterance (`id`, `ref`, `hyp`, then the kind's own scores) so that failures can be inspected:
    json rows list the `missing_slots` and `extra_slots` as `key=value`."""
    _check_kind(kind)
    ids = list(ids)
    references, hypotheses = _pair(references, hypotheses)
    if len(ids) != len(references):
        raise ValueError(f"got {len(ids)} ids for {len(references)} utterances; they must pair up")
    if kind == "transcription":
        return per_utterance_rows(ids, references, hypotheses, normalize=normalize)
    clean = _cleaner(normalize)
    rows = []
    for index, (utterance_id, ref, hyp) in enumerate(zip(ids, references, hypotheses)):
        scores = _json_row(ref, hyp, clean, index) if kind == "json" else _answer_row(ref, hyp, clean, normalize)
        rows.append({"id": utterance_id, "ref": ref, "hyp": hyp, **scores})
    return rows


def infer_kind(task: str | None, references: Sequence[str]) -> str:
    """The metric kind of a task nobody named one for: transcription for no task or a transcribe/transcription/asr
    task (any case), json when every reference is a JSON object, answer otherwise."""
    if task is None or task.strip().lower() in TRANSCRIPTION_TASKS:
        return "transcription"
    references = list(references)
    if references and all(parse_json_object(ref) is not None for ref in references):
        return "json"
    return "answer"


def parse_task_metrics(items: Sequence[str] | None) -> dict[str, str]:
    """`["slu=json", "qa=answer"]` (the CLI's repeated `--task-metric`) -> {"slu": "json", "qa": "answer"}."""
    mapping = {}
    for item in items or ():
        task, sep, kind = item.partition("=")
        if not sep or not task.strip():
            raise ValueError(f"--task-metric expects TASK=KIND, got {item!r}")
        mapping[task.strip()] = _check_kind(kind.strip())
    return mapping


def group_by_task(records: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """Record indices per task name, in order of first appearance; records without a task are `UNTAGGED`."""
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        task = record.get("task")
        groups.setdefault(UNTAGGED if task is None else task, []).append(index)
    return groups


def resolve_kinds(records: Sequence[Mapping[str, Any]], task_metrics: Mapping[str, str] | None = None
                  ) -> dict[str, str]:
    """The metric kind of every task in `records` (`group_by_task`'s names): `task_metrics` first, else inferred.

    A task named json whose references are not all JSON objects is a ValueError naming the record, raised here
    (before any decoding) rather than when scoring.
    """
    task_metrics = dict(task_metrics or {})
    for kind in task_metrics.values():
        _check_kind(kind)
    kinds = {}
    for name, indices in group_by_task(records).items():
        task = records[indices[0]].get("task")
        kinds[name] = task_metrics.get(name) or infer_kind(task, [records[i]["text"] for i in indices])
        for index in indices if kinds[name] == "json" else ():
            if parse_json_object(records[index]["text"]) is None:
                where = records[index].get("location") or f"record {index}"
                raise ValueError(f"{where}: task {name!r} is scored as json but its reference is not a JSON object")
    return kinds


def score_records(records: Sequence[Mapping[str, Any]], hypotheses: Sequence[str],
                  task_metrics: Mapping[str, str] | None = None, normalize: Normalize = True
                  ) -> dict[str, dict[str, Any]]:
    """{task: {"kind": ..., **score_task(...)}} for manifest records (their `text` is the reference)."""
    hypotheses = list(hypotheses)
    if len(hypotheses) != len(records):
        raise ValueError(f"got {len(records)} records but {len(hypotheses)} hypotheses; they must pair up")
    kinds = resolve_kinds(records, task_metrics)
    scores = {}
    for name, indices in group_by_task(records).items():
        references = [records[i]["text"] for i in indices]
        scores[name] = {"kind": kinds[name],
                        **score_task(kinds[name], references, [hypotheses[i] for i in indices], normalize)}
    return scores


def transcription_scores(records: Sequence[Mapping[str, Any]], hypotheses: Sequence[str], kinds: Mapping[str, str],
                         normalize: Normalize = True) -> dict[str, Any] | None:
    """`word_error_rate` pooled over every record whose task is scored as transcription (None when there is none):
    the overall WER of a multi-task manifest, which JSON and short answers must not dilute."""
    groups = group_by_task(records)
    indices = sorted(i for name, group in groups.items() if kinds[name] == "transcription" for i in group)
    if not indices:
        return None
    return word_error_rate([records[i]["text"] for i in indices], [hypotheses[i] for i in indices], normalize)


def headline_metrics(scores: Mapping[str, Mapping[str, Any]], overall: Mapping[str, Any] | None = None,
                     prefix: str = "eval") -> dict[str, float]:
    """Flat metrics for training logs from `score_records`' result: one task logs `{prefix}_{metric}`; several log
    `{prefix}_{task}_{metric}` each, plus `{prefix}_wer` / `{prefix}_cer` from `overall` (`transcription_scores`),
    so that the training curves keep one WER."""
    if len(scores) == 1:
        (task_scores,) = scores.values()
        return {f"{prefix}_{key}": task_scores[key] for key in HEADLINE[task_scores["kind"]]}
    metrics = {f"{prefix}_{task}_{key}": values[key]
               for task, values in scores.items() for key in HEADLINE[values["kind"]]}  # fmt: skip
    if overall is not None:
        metrics.update({f"{prefix}_wer": overall["wer"], f"{prefix}_cer": overall["cer"]})
    return metrics


def pooled_loss(metrics: Mapping[str, float], sizes: Mapping[str, int], prefix: str = "eval"
                ) -> dict[str, float] | None:
    """`{prefix}_loss` from per-task eval losses (`{prefix}_{task}_loss`, as `Trainer` names them for a dict of eval
    sets), weighted by each task's number of utterances, so that a multi-task run keeps one eval-loss curve; None
    when a task's loss is missing."""
    losses = [(sizes[task], metrics.get(f"{prefix}_{task}_loss")) for task in sizes]
    total = sum(size for size, _ in losses)
    if not total or any(loss is None for _, loss in losses):
        return None
    return {f"{prefix}_loss": sum(size * loss for size, loss in losses) / total}

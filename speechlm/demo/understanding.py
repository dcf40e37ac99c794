"""Understanding tasks rendered from the structured domain: the same clips, other instructions, other answers.

The grammar knows what each sentence asks (`grammar.Utterance`), so every clip can be taught and tested three ways:
- `transcribe`: the words;
- `slu`: the intent and slot values as one JSON object, e.g. `{"intent": "set_alarm", "time": "seven thirty"}`;
- `slu_transcript`: the same frame after the words it was read from (`{"transcript": ..., "intent": ...}`), so the
  intent is chosen by an LLM that has just written the sentence out, as it would choose it from text;
- `qa`: a question about one slot ("What time does the speaker mention?") answered with its value;
- `qa_transcript`: the same question answered after the words (`{"transcript": ..., "answer": ...}`), so the answer
  is picked out of a sentence the LLM has just written, as `slu_transcript` does for the frame.
Held-out voices and held-out sentences stay held out for every task (the test clips are the transcription test clips).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..inference.structured import WORDS_FROM
from ..tasks import parse_json_object
from .grammar import (
    TEMPLATES,
    Utterance,
    intent_of,
    sentence_pattern,
    slot_pattern,
    template_slots,
    text_only_utterances,
)
from .text import WORDS_PATTERN

TASKS = ("transcribe", "slu", "slu_transcript", "qa", "qa_transcript")
TRANSCRIBE_PROMPT = "Transcribe:"
SLU_PROMPT = "Intent and slots as JSON:"
SLU_TRANSCRIPT_PROMPT = "Transcript, intent and slots as JSON:"
QA_TRANSCRIPT_INSTRUCTION = "Transcript, then the answer, as JSON:"
METRIC_KINDS = {"transcribe": "transcription", "slu": "json", "slu_transcript": "json", "qa": "answer",
                "qa_transcript": "answer"}
# How every JSON answer of the demo is laid out (what `json.dumps` writes), for the decoder's grammar.
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Example:
    """One training or test pair: the instruction the LLM reads after the audio and the answer it should give."""

    task: str
    prompt: str
    target: str


def parse_tasks(value: str | Sequence[str]) -> tuple[str, ...]:
    """`"transcribe,slu"` -> ("transcribe", "slu"); transcription must stay one of them (the demo reports WER)."""
    tasks = tuple(t.strip() for t in (value.split(",") if isinstance(value, str) else value) if t.strip())
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if "transcribe" not in tasks:
        raise ValueError("tasks must include 'transcribe' (every held-out set is scored by WER)")
    return tasks


def slu_target(utterance: Utterance, transcript: bool = False) -> str:
    """The JSON answer: the intent first, then the slots in spoken order (keys made unique by the grammar); with
    `transcript`, the sentence before them."""
    words = {"transcript": utterance.text} if transcript else {}
    return json.dumps({**words, "intent": utterance.intent, **dict(utterance.slots)})


def slu_schema(values: bool = False, transcript: bool = False, quoted: bool = False, sentences: bool = False
               ) -> dict:
    """The domain's ontology as a JSON schema, what an SLU deployment would hand the decoder (`response_format`): one
    frame per (intent, slot keys) a template can say, the intent first, laid out as `slu_target` writes them. Slot
    values are free text, or with `values` only what the grammar can fill that slot with (an entity catalogue);
    `transcript` puts the words before the intent (the `slu_transcript` task; in the demo's text form, `_transcript`),
    `quoted` holds each slot value to words of it (every slot value of the grammar is words of its sentence), and
    `sentences` holds the transcript to the sentences the domain can say (`_sentence_definition`)."""
    words = {"transcript": _transcript(sentences)} if transcript else {}

    def value(name: str) -> dict:
        return {"type": "string", "pattern": f"^(?:{slot_pattern(name)})$"} if values else {"type": "string"}

    frames = dict.fromkeys((intent_of(t), tuple(s if values else (s[0], None) for s in template_slots(t)))
                           for templates in TEMPLATES.values() for t in templates)
    return {
        "anyOf": [{"type": "object", "additionalProperties": False,
                   "required": [*words, "intent", *(k for k, _ in slots)],
                   "properties": {**words, "intent": {"const": intent}, **{key: value(name) for key, name in slots}}}
                  for intent, slots in frames],
        "x-guidance": _LAYOUT,
        **({WORDS_FROM: "transcript"} if quoted and transcript else {}),
        **_sentence_definition(sentences and transcript),
    }


def _transcript(sentences: bool) -> dict:
    """A transcript field: words in the form every training transcript is written in (`text.WORDS_PATTERN`), or with
    `sentences` one of the domain's sentences (`_sentence_definition`). Free, 8 beams held 3.5 distinct answers a
    clip on average, the rest the same words with a space or a full stop after them (session 44)."""
    return {"$ref": "#/$defs/sentence"} if sentences else {"type": "string", "pattern": f"^(?:{WORDS_PATTERN})$"}


def _sentence_definition(sentences: bool) -> dict:
    """The definition a transcript held to the domain's sentences refers to: every sentence the grammar can say, as
    a command application knows what it can be asked (a half-heard command is written as the nearest one it can
    take). Defined once and referred to by every frame: llguidance builds it once, where it would build it per
    frame inlined. The transcription task's own output stays free."""
    return {"$defs": {"sentence": {"type": "string", "pattern": f"^(?:{sentence_pattern()})$"}}} if sentences else {}


def qa_transcript_schema(pattern: str | None = None, quoted: bool = False, sentences: bool = False) -> dict:
    """The `qa_transcript` answer's schema: the transcript, then the answer, free text or held to `pattern` (one
    question's `answer_pattern`), and with `quoted` to words of the transcript (itself held to the domain's
    sentences with `sentences`)."""
    answer = {"type": "string", "pattern": f"^(?:{pattern})$"} if pattern else {"type": "string"}
    return {"type": "object", "additionalProperties": False, "required": ["transcript", "answer"],
            "properties": {"transcript": _transcript(sentences), "answer": answer}, "x-guidance": _LAYOUT,
            **({WORDS_FROM: "transcript"} if quoted else {}), **_sentence_definition(sentences)}


def answer_of(task: str, text: str) -> str:
    """What a `qa_transcript` answer (or reference) answers: its `answer` field ("" when the text is not such a JSON
    object); other tasks' texts as they are."""
    if task != "qa_transcript":
        return text
    value = (parse_json_object(text) or {}).get("answer")
    return value if isinstance(value, str) else ""


def write_schemas(folder: Path, tasks: Sequence[str]) -> list[Path]:
    """Next to a trained model, the schema of each JSON task it learned (`slu_schema.json`,
    `slu_transcript_schema.json`, `qa_transcript_schema.json`), with the domain's entity catalogue as the demo holds
    its answers (values quoted from the transcript where one comes first), for `speechlm evaluate --task-schema
    slu=...` and the server's `response_format`."""
    paths = []
    for task in tasks:
        if (schema := task_schema(task, values=True, quoted=True)) is not None:
            paths.append(folder / f"{task}_schema.json")
            paths[-1].write_text(json.dumps(schema, indent=1) + "\n")
    return paths


def task_schema(task: str, values: bool = False, quoted: bool = False, sentences: bool = False) -> dict | None:
    """The schema a JSON task's answers follow (`slu_schema`, with the transcript first for `slu_transcript`, slot
    values held to the catalogue with `values` and to the transcript's words with `quoted`, the transcript to the
    domain's sentences with `sentences`; `qa_transcript_schema` with a free answer, whose catalogue is per question:
    `answer_pattern`); None for a task whose answer is not JSON."""
    if task == "qa_transcript":
        return qa_transcript_schema(quoted=quoted, sentences=sentences)
    if METRIC_KINDS[task] != "json":
        return None
    return slu_schema(values=values, transcript=task == "slu_transcript", quoted=quoted, sentences=sentences)


def _split_key(key: str) -> tuple[str, str]:
    """A slot key -> (the key without its `_2`/`_3`, that index or "")."""
    name, _, index = key.rpartition("_") if key.rsplit("_", 1)[-1].isdigit() else (key, "", "")
    return name, index


def _asked_slot(utterance: Utterance) -> tuple[str, str, str]:
    """(slot key without its index, the index or "", value) of the slot a question asks about, chosen by a hash of
    the sentence (stable across runs)."""
    key, value = utterance.slots[zlib.crc32(utterance.text.encode()) % len(utterance.slots)]
    return *_split_key(key), value


def question(utterance: Utterance) -> tuple[str, str] | None:
    """One (question, answer) about a slot; None when the sentence has no slot to ask about."""
    if not utterance.slots:
        return None
    name, index, value = _asked_slot(utterance)
    ordinal = {"2": "second ", "3": "third "}.get(index, "")
    return f"What {ordinal}{name.replace('_', ' ')} does the speaker mention?", value


def answer_pattern(utterance: Utterance) -> str | None:
    """A regular expression for every value the asked slot can take in any template (the entity catalogue for a QA
    answer, as `slu_schema(values=True)` is for SLU); None when nothing is asked."""
    if not utterance.slots:
        return None
    asked = _asked_slot(utterance)[0]
    names = sorted({name for templates in TEMPLATES.values() for t in templates for key, name in template_slots(t)
                    if _split_key(key)[0] == asked})
    return "|".join(f"(?:{slot_pattern(name)})" for name in names)


def examples(text: str, utterance: Utterance | None, tasks: Sequence[str]) -> list[Example]:
    """Every example a clip gives for `tasks` (only transcription when its sentence has no known meaning)."""
    out = [Example("transcribe", TRANSCRIBE_PROMPT, text)]
    if utterance is None:
        return out
    if "slu" in tasks:
        out.append(Example("slu", SLU_PROMPT, slu_target(utterance)))
    if "slu_transcript" in tasks:
        out.append(Example("slu_transcript", SLU_TRANSCRIPT_PROMPT, slu_target(utterance, transcript=True)))
    if (pair := question(utterance)) is not None:
        asked, answer = pair
        if "qa" in tasks:
            out.append(Example("qa", asked, answer))
        if "qa_transcript" in tasks:
            target = json.dumps({"transcript": utterance.text, "answer": answer})
            out.append(Example("qa_transcript", f"{asked} {QA_TRANSCRIPT_INSTRUCTION}", target))
    return out


def training_examples(text: str, utterance: Utterance | None, tasks: Sequence[str]) -> list[Example]:
    """What a training clip contributes: its transcription always, plus one understanding example (alternating
    between the understanding tasks by `_task_hash` of the sentence), so transcription keeps half of the steps."""
    everything = examples(text, utterance, tasks)
    if len(everything) <= 2:
        return everything
    return [everything[0], everything[1 + _task_hash(text) % (len(everything) - 1)]]


def _task_hash(text: str) -> int:
    """The hash that picks a training sentence's understanding task: not the crc32 that picks its asked slot
    (`_asked_slot`) and its side of the split (`grammar.is_held_out`). Until session 48 one crc32 chose all three, so
    a training question on a two-slot sentence always asked the second slot (odd crc: the question task) and a
    held-out one the first (crc divisible by 8)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def text_only_examples(count: int, tasks: Sequence[str], seed: int = 0, distinct: bool = True) -> list[dict]:
    """Understanding examples of `count` fresh grammar sentences (`text_only_utterances`: distinct, or drawn with
    repeats), one task each as `training_examples` alternates, for text-only rows (`SpeechLMCollator(text_examples=
    ...)`): the sentence's words stand where its clip would."""
    if not set(tasks) - {"transcribe"}:
        raise ValueError("text-only examples teach an understanding task's answer; --tasks has none beside transcribe")
    return [{"prompt": example.prompt, "text": example.target, "transcript": utterance.text, "task": example.task}
            for utterance in text_only_utterances(count, seed, distinct)
            for example in training_examples(utterance.text, utterance, tasks)[1:]]


# ------------------------------------------------------------------------------------------------------ cascade
def cascade_prompt(task: str, instruction: str, transcript: str, shots: Sequence[tuple[str, Example]]) -> str:
    """Text-only few-shot prompt for the cascade anchor: an ASR transcript handed to the same LLM with the same
    instruction, after `shots` (transcript, example) pairs from the training sentences."""
    blocks = [f"Transcript: {text}\n{shot.prompt} {shot.target}" for text, shot in shots if shot.task == task]
    return "\n\n".join([*blocks, f"Transcript: {transcript}\n{instruction}"])

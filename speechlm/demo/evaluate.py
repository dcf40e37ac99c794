"""The demo's held-out evaluation: WER per set beside Whisper tiny.en, and the understanding tasks beside a cascade.

Everything goes through the path users take (audio in, text out: `transcribe_arrays`), on the saved and reloaded
model. Anchors: Whisper tiny.en alone on the same clips for transcription; for understanding, the cascade (Whisper
tiny.en's transcript handed to the same base LLM with the same instruction, few-shot) on the same clips.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .understanding import (
    METRIC_KINDS,
    TASKS,
    answer_of,
    answer_pattern,
    cascade_prompt,
    examples,
    qa_transcript_schema,
    question,
    task_schema,
)

TEST_SETS = ("test_synthetic", "test_fortunes", "test_asterisk", "test_librivox", "test_uqm")
# UQM lines (the test set and the development set of benchmarks/joint_ctc.py) run up to 15 s (~45 words); the
# others are short.
MAX_NEW_TOKENS = {"test_uqm": 96, "dev_uqm": 96}


TOKENS_PER_SECOND = 5.0  # fast speech is ~4 words/s; a transcript longer than this is made up


def transcribe_capped(model, processor, audio: list, max_new_tokens: int, batch_size: int = 16, **kwargs) -> list[str]:
    """`transcribe_arrays` with each clip's new tokens capped by its length (`TOKENS_PER_SECOND`): a model that has
    not learned when to stop cannot run on for 96 tokens after a one-second clip."""
    from ..inference import transcribe_arrays

    return transcribe_arrays(model, processor, audio, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             tokens_per_second=TOKENS_PER_SECOND, **kwargs)


@torch.no_grad()
def ctc_head_transcripts(model, processor, audio: list, batch_size: int = 16) -> list[str]:
    """The CTC head's greedy transcripts (best class per audio token, repeats merged, blanks dropped): what the
    projector alone carries, without the LLM, for one encoder pass. The curve draws it beside the LLM's answers,
    which say little while the pre-alignment has not yet trained anything the LLM reads."""
    texts = []
    for start in range(0, len(audio), batch_size):
        batch = processor.extract_audio(audio[start : start + batch_size])
        ids = model.ctc_head.greedy_token_ids(*model.ctc_head.logits(model, dict(batch)))
        texts += [text.strip() for text in processor.tokenizer.batch_decode(ids)]
    return texts


def evaluate_sets(model, processor, manifests: dict[str, Path], limit: int | None, num_beams: int = 1,
                  reference: bool = True, sets: tuple[str, ...] = TEST_SETS, on_result=None, ctc_head: bool = False,
                  **generate_kwargs) -> dict[str, dict]:
    """WER/CER and hypotheses on every held-out set, through the same path users take (audio in, text out), with
    Whisper tiny.en alone on the same clips beside it (`reference`), both through the corpus's normaliser. With
    `ctc_head` (and a model that has one) the head's own greedy reading is scored too (`metrics["ctc_head"]`): how
    much of the answer the projector carries and how much the LLM adds.
    `generate_kwargs` (e.g. `repetition_penalty`) override the model's saved decoding settings; `on_result(name,
    metrics)` gets each set as it ends (the demo keeps it at once: a stopped evaluation keeps what it measured)."""
    from ..audio import load_audio
    from ..evaluation import per_utterance_rows, word_error_rate
    from ..evaluation.normalizers import normalize_text
    from .corpus import manifest_records

    results = {}
    for name in sets:
        if not manifests[name].is_file():
            continue
        rows = manifest_records(manifests[name])[:limit]
        if not rows:
            continue
        audio = [load_audio(row["audio"]) for row in rows]
        start = time.monotonic()
        hyps = transcribe_capped(model, processor, audio, MAX_NEW_TOKENS.get(name, 48), num_beams=num_beams,
                                 **generate_kwargs)
        refs = [row["text"] for row in rows]
        spelled = [normalize_text(h, spell_numbers=True) for h in hyps]
        metrics = word_error_rate(refs, spelled)
        metrics["seconds"] = time.monotonic() - start
        metrics["rows"] = per_utterance_rows([row["id"] for row in rows], refs, hyps)
        if ctc_head and model.ctc_head is not None:
            head = ctc_head_transcripts(model, processor, audio)
            metrics["ctc_head"] = word_error_rate(refs, [normalize_text(h, spell_numbers=True) for h in head])
        if reference:
            metrics["whisper"] = word_error_rate(refs, whisper_for(manifests[name], rows))
        results[name] = metrics
        if on_result:
            on_result(name, metrics)
    return results


# A JSON frame of this domain is < 50 tokens (< 100 after its transcript), an answer < 10.
UNDERSTANDING_TOKENS = {"slu": 64, "slu_transcript": 112, "qa": 16, "qa_transcript": 112}
CASCADE_SHOTS = 8


def evaluate_understanding(model, processor, manifests: dict[str, Path], tasks, seed: int, limit: int | None,
                           decoder: tuple[str, str | None] | None = None, num_beams: int = 1,
                           on_result=None, free: bool = True) -> dict[str, dict]:
    """Each understanding task on the held-out synthetic clips (held-out voices and sentences), scored by its
    metric kind (`speechlm.tasks`), with the cascade (greedy) beside it when `decoder` (the base LLM's path, GGUF
    file) is given. Answers are held as a deployment would hold them (`held_structure`) and decoded with `num_beams`
    beams, as the transcriptions are; the same model decoding freely is scored beside (`free`). A model that carries
    a joint CTC weight decodes the transcript field of `slu_transcript` and `qa_transcript` answers jointly with its
    head (`joint_decoding`), as its transcriptions are; a `qa_transcript` answer is scored by its `answer` field
    (`answer_of`), its whole output kept in the rows. With beams and values quoted from a transcript, the answer
    is the best beam whose values are all quoted (`first_quoted`; a frame that had to take a value from elsewhere is
    most often the wrong frame), the best beam scored beside (`best_beam`) from the same decoding.
    `on_result(task, metrics)` gets each task as it ends; `free=False` leaves free decoding out (a benchmark of
    the held decoding alone)."""
    from ..audio import load_audio
    from ..inference import first_quoted, transcribe_arrays
    from ..tasks import score_task, task_rows
    from .corpus import manifest_records
    from .grammar import utterances

    rows = manifest_records(manifests["test_synthetic"])[:limit]
    meanings = utterances([row["text"] for row in rows], seed)
    rows = [row for row in rows if row["text"] in meanings]
    audio = {row["id"]: load_audio(row["audio"]) for row in rows}
    shots = _cascade_shots(manifests["train"], seed) if decoder else []
    results = {}
    for task in (t for t in tasks if t != "transcribe"):
        pairs = [(row, ex) for row in rows for ex in examples(row["text"], meanings[row["text"]], [task])
                 if ex.task == task]
        refs, kind = [answer_of(task, ex.target) for _, ex in pairs], METRIC_KINDS[task]
        said = [meanings[row["text"]] for row, _ in pairs]
        structure = held_structure(task, said)
        inputs = dict(audios=[audio[row["id"]] for row, _ in pairs], prompt=[ex.prompt for _, ex in pairs],
                      batch_size=16, max_new_tokens=UNDERSTANDING_TOKENS[task], num_beams=num_beams,
                      **joint_decoding(model, processor, task))
        schemas = quoting_schemas(structure, len(pairs)) if num_beams > 1 else None
        start = time.monotonic()
        outputs = transcribe_arrays(model, processor, **structure, **inputs,
                                    num_return_sequences=num_beams if schemas else 1)
        beams = outputs if schemas else None
        if beams:  # the best beam whose values are all quoted, the best beam measured beside
            outputs = [first_quoted(schema, candidates) for schema, candidates in zip(schemas, beams, strict=True)]
        hyps = [answer_of(task, text) for text in outputs]
        metrics = score_task(kind, refs, hyps)
        metrics["seconds"] = time.monotonic() - start
        if beams:
            metrics["best_beam"] = score_task(kind, refs, [answer_of(task, candidates[0]) for candidates in beams])
        if structure and free:  # the same model decoding freely: what the structure adds
            freely = transcribe_arrays(model, processor, **inputs)
            metrics["free"] = score_task(kind, refs, [answer_of(task, text) for text in freely])
        scored = task_rows(kind, [row["id"] for row, _ in pairs], refs, hyps)
        metrics["rows"] = [{**row, "output": output, **({"beams": beams[n]} if beams else {})}
                           for n, (row, output) in enumerate(zip(scored, outputs))]
        metrics["prompts"] = [ex.prompt for _, ex in pairs]
        if decoder:
            transcripts = whisper_for(manifests["test_synthetic"], rows)
            by_id = dict(zip([row["id"] for row in rows], transcripts, strict=True))
            # The cascade has its transcript already: a question is asked as the `qa` task asks it.
            form = "qa" if task == "qa_transcript" else task
            instructions = [question(u)[0] if form != task else ex.prompt for u, (_, ex) in zip(said, pairs)]
            cascade = cascade_answers(decoder, form, [(by_id[row["id"]], instruction) for (row, _), instruction
                                                      in zip(pairs, instructions)], shots,
                                      **held_structure(form, said))
            metrics["cascade"] = score_task(kind, refs, cascade)
        results[task] = metrics
        if on_result:
            on_result(task, metrics)
    return results


def quoting_schemas(structure: dict, count: int) -> list[dict] | None:
    """Each clip's schema when `structure` quotes values from a transcript field (`WORDS_FROM`), else None."""
    from ..inference.structured import quoting

    schemas = structure.get("json_schema")
    schemas = schemas if isinstance(schemas, list) else [schemas] * count
    return schemas if all(map(quoting, schemas)) else None


def joint_decoding(model, processor, task: str) -> dict:
    """`generate` options that decode the transcript field of an `slu_transcript` or `qa_transcript` answer jointly
    with the model's CTC head at the weight it carries (what follows it stays the LLM's); none for other tasks. On
    two trained models it lifted slot F1 by a few points (README)."""
    from ..joint_ctc import joint_options

    return joint_options(processor.tokenizer, model.joint_ctc_weight, False, task_schema(task))


def held_structure(task: str, utterances: list, quoted: bool = True, sentences: bool = False) -> dict:
    """How a deployment would hold each answer: SLU to the domain's schema with its entity catalogue (`task_schema`
    with `values`: each slot to the values the domain can fill it with, as a deployment holds a contact to its
    contact list), a question's answer to the values its slot can take (`answer_pattern`, one per clip; after a free
    transcript for `qa_transcript`); after a transcript, each value also `quoted` from its words where some fit, and
    with `sentences` the transcript held to the domain's sentences."""
    if task == "qa_transcript":
        patterns = [answer_pattern(utterance) for utterance in utterances]
        schemas = {p: qa_transcript_schema(p, quoted, sentences) for p in set(patterns)}  # one per slot kind
        return {"json_schema": [schemas[pattern] for pattern in patterns]}
    if (schema := task_schema(task, values=True, quoted=quoted, sentences=sentences)) is not None:
        return {"json_schema": schema}
    if task == "qa":
        return {"regex": [answer_pattern(utterance) for utterance in utterances]}
    return {}


def whisper_for(manifest: Path, rows: list[dict]) -> list[str]:
    """Whisper tiny.en's normalised transcripts of `rows` (cached next to the manifest, shared with the WER table)."""
    from ..evaluation.normalizers import normalize_text
    from .reference import whisper_transcripts

    hyps = whisper_transcripts([row["audio"] for row in rows], manifest.with_suffix(f".whisper-{len(rows)}.json"))
    return [normalize_text(h, spell_numbers=True) for h in hyps]


def _cascade_shots(train_manifest: Path, seed: int) -> list[tuple[str, object]]:
    """(transcript, example) pairs from the first training sentences: the cascade's few-shot examples."""
    from .corpus import manifest_records
    from .grammar import utterances

    rows = [row for row in manifest_records(train_manifest) if row["extra"].get("source") == "synthetic"]
    rows = rows[: 4 * CASCADE_SHOTS]
    meanings = utterances([row["text"] for row in rows], seed)
    shots = []
    for task in (t for t in TASKS if t != "transcribe"):
        pairs = [(row["text"], ex) for row in rows if row["text"] in meanings
                 for ex in examples(row["text"], meanings[row["text"]], [task]) if ex.task == task]
        shots += pairs[:CASCADE_SHOTS]
    return shots


@torch.no_grad()
def cascade_answers(decoder: tuple[str, str | None], task: str, queries: list[tuple[str, str]], shots,
                    batch_size: int = 8, **structure) -> list[str]:
    """The base LLM's greedy answer to each (transcript, instruction) after the few-shot examples; the answer ends
    at the first line break (the model would go on with another example). For `slu` the instruction also lists
    every intent name, which the LLM cannot guess from eight examples; a `json_schema` or `regex` option (one, or
    one per query) holds it to the same structure as the end-to-end model."""
    from ..factory import load_decoder
    from ..inference.decoding import per_clip_structures, structured_batches
    from ..inference.structured import with_json_schema
    from .grammar import TEMPLATES, intent_of

    path, gguf_file = decoder
    tokenizer, llm = load_decoder(path, **({"gguf_file": gguf_file} if gguf_file else {}), dtype=torch.float32)
    llm.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    intents = sorted({intent_of(t) for templates in TEMPLATES.values() for t in templates})
    preamble = f"Intents: {', '.join(intents)}.\n\n" if METRIC_KINDS[task] == "json" else ""
    prompts = [preamble + cascade_prompt(task, instruction, transcript, shots) for transcript, instruction in queries]
    structures = per_clip_structures(structure, len(prompts))
    order = sorted(range(len(prompts)), key=lambda i: structures[i][0])
    answers = [""] * len(prompts)
    for index in structured_batches(structures, order, batch_size):
        batch = tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True)
        options = with_json_schema(structures[index[0]][1], llm, tokenizer)
        tokens = llm.generate(**batch, max_new_tokens=UNDERSTANDING_TOKENS[task], do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, **options)
        texts = tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(index, texts):
            answers[i] = text.strip().split("\n")[0].strip()
    return answers

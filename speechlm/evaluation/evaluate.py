"""Model evaluation: transcribe (or answer) manifest records through the shared decoding loop, then score them.

The model code, torch and the data loaders are imported inside the functions, so that importing this module (and
`speechlm evaluate --help`) stays light.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .metrics import per_utterance_rows, word_error_rate
from .normalizers import normalizer_description
from .outputs import format_report, json_safe, write_jsonl

# Records are decoded and transcribed in groups of this many batches, so a long evaluation set never sits in memory
# as decoded audio all at once while batches stay length-sorted within each group.
_BATCHES_PER_GROUP = 32


def transcribe_records(
    model,
    processor,
    records: Sequence[dict[str, Any]],
    batch_size: int = 8,
    prompt: str | None = None,
    task_prompts: dict[str, str] | None = None,
    progress: bool = False,
    tokens_per_second: float | None = None,
    kinds: dict[str, str] | None = None,
    task_schemas: dict[str, dict] | None = None,
    joint_ctc_weight: float = 0.0,
    prefer_quoted: bool = False,
    **generate_kwargs,
) -> list[str]:
    """Hypotheses for manifest records (see `speechlm.data`), in record order, through `transcribe_arrays`.

    A record's own `prompt` wins, then its `task`'s prompt from `task_prompts`, then `prompt`, then the processor's
    default. A chat record (`messages`) is answered from its conversation up to its last assistant message (that
    message is its reference) through the processor's chat path, stopping at the end-of-turn token.
    `tokens_per_second` caps the new tokens of transcription records by their length (`transcribe_arrays`); the
    other tasks' answers are not capped. `kinds` ({task: metric kind}, default `resolve_kinds(records)`) says which.
    `task_schemas` ({task: JSON schema}) holds that task's answers to its schema while decoding
    (`speechlm.inference.structured`), e.g. an SLU task to its intents and slots. `joint_ctc_weight` > 0 decodes the
    transcription records jointly with the model's CTC head (`speechlm.joint_ctc`), and the transcript field of a
    task whose schema opens its answers with one (`schema_transcript_span`); other answers are not the transcript the
    head reads, so they are decoded by the LLM alone. `prefer_quoted` answers each record of a task whose schema
    quotes its values from a transcript with its best beam whose values all are (`transcribe_arrays`).
    """
    from tqdm.auto import tqdm

    from ..data.dataset import load_record_audio, resolve_prompt
    from ..inference.decoding import transcribe_arrays
    from ..inference.structured import quoting
    from ..joint_ctc import joint_options
    from ..tasks import UNTAGGED, resolve_kinds

    if (tokens_per_second is not None or joint_ctc_weight) and kinds is None:
        kinds = resolve_kinds(records)
    schemas = task_schemas or {}

    def transcription(record: dict[str, Any]) -> bool:
        task = record.get("task")
        return kinds is not None and kinds.get(UNTAGGED if task is None else task) == "transcription"

    hypotheses: list[str] = []
    group = max(1, batch_size) * _BATCHES_PER_GROUP
    with tqdm(total=len(records), desc="evaluating", unit="utt", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(records), group):
            chunk = records[start : start + group]
            plain = [i for i, record in enumerate(chunk) if record.get("messages") is None]
            chats = [i for i, record in enumerate(chunk) if record.get("messages") is not None]
            audios = [load_record_audio(chunk[i], processor.sampling_rate) for i in plain]
            prompts = []
            for i in plain:
                own = resolve_prompt(chunk[i], task_prompts)
                prompts.append(own if own is not None else prompt if prompt is not None else processor.prompt)
            texts = {}
            groups: dict[tuple, list[int]] = {}  # rows decoded alike: (transcription?, task whose schema holds)
            for n, i in enumerate(plain):
                task = chunk[i].get("task")
                groups.setdefault((transcription(chunk[i]), task if task in schemas else None), []).append(n)
            for (transcribed, schema_task), rows in groups.items():
                schema = schemas.get(schema_task)
                joint = joint_options(processor.tokenizer, joint_ctc_weight, transcribed, schema)
                decoded = transcribe_arrays(model, processor, [audios[n] for n in rows],
                                            prompt=[prompts[n] for n in rows], batch_size=batch_size,
                                            tokens_per_second=tokens_per_second if transcribed else None,
                                            json_schema=schema, prefer_quoted=prefer_quoted and quoting(schema),
                                            **joint, **generate_kwargs)
                texts.update(zip((plain[n] for n in rows), decoded))
            if chats:
                conversations = [_chat_history(chunk[i], processor.sampling_rate) for i in chats]
                texts.update(zip(chats, _answer_chats(model, processor, conversations, batch_size, **generate_kwargs)))
            hypotheses += [texts[i] for i in range(len(chunk))]
            bar.update(len(chunk))
    return hypotheses


def _chat_history(record: dict[str, Any], sampling_rate: int) -> list[dict[str, Any]]:
    """A chat record's messages before its last assistant message (its reference), every clip decoded."""
    from ..chat import AudioPart, load_clip

    messages = list(record["messages"])
    last = max(i for i, message in enumerate(messages) if message.role == "assistant")
    return [{"role": message.role,
             "content": [{"type": "audio", "audio": load_clip(part, sampling_rate), "sampling_rate": sampling_rate}
                         if isinstance(part, AudioPart) else {"type": "text", "text": part} for part in message.parts]}
            for message in messages[:last]]  # fmt: skip


def _answer_chats(model, processor, conversations: list, batch_size: int, **generate_kwargs) -> list[str]:
    import torch

    from ..inference.decoding import default_generation_kwargs

    kwargs = default_generation_kwargs(model, **generate_kwargs)
    kwargs.setdefault("eos_token_id", processor.end_of_turn_token_ids)  # a chat-trained model ends its turn there
    device = next(model.parameters()).device
    answers: list[str] = []
    with torch.no_grad():
        for start in range(0, len(conversations), max(1, batch_size)):
            inputs = processor.apply_chat_template(conversations[start : start + batch_size])
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            answers += processor.batch_decode(model.generate(**inputs, **kwargs))
    return answers


def evaluate_model(
    model,
    processor,
    manifest_or_records,
    batch_size: int = 8,
    prompt: str | None = None,
    output_dir: str | Path | None = None,
    *,
    on_error: str = "raise",
    limit: int | None = None,
    task_prompts: dict[str, str] | None = None,
    task_metrics: dict[str, str] | None = None,
    normalize: bool | Callable[[str], str] = True,
    model_name: str | None = None,
    progress: bool = False,
    tokens_per_second: float | None = None,
    task_schemas: dict[str, dict] | None = None,
    joint_ctc_weight: float = 0.0,
    prefer_quoted: bool = False,
    **generate_kwargs,
) -> dict[str, Any]:
    """Transcribe a manifest (path, `speechlm.data.Manifest`, `datasets.Dataset` or list of record dicts) and score it.

    Returns `word_error_rate`'s metrics plus `n_skipped` (manifest entries dropped with `on_error="skip"`),
    `elapsed_seconds`, `audio_seconds` and `real_time_factor`. When records carry a `task` (or `task_metrics` names a
    kind for untagged records), each task is scored by its metric kind (`speechlm.tasks`) under `tasks`
    ({task: {"kind", ...}}), the top-level WER/CER cover the transcription tasks only (absent when there are none)
    and `n_utterances` counts every record. Each record is decoded with its own prompt (`transcribe_records`).
    With `output_dir`, also writes `predictions.jsonl` (one row per utterance, with its `task` and `kind` when there
    are tasks, for error analysis), `metrics.json` and `summary.md` (naming `model_name` and the normaliser) there.
    `tokens_per_second` caps each transcription record's new tokens by its audio length (`transcribe_arrays`);
    `task_schemas` ({task: JSON schema}) holds a task's answers to its schema while decoding; `joint_ctc_weight` decodes
    the transcription records jointly with the model's CTC head; `prefer_quoted` answers a task whose schema quotes
    from a transcript with each record's best quoted beam (`transcribe_records`). `generate_kwargs` reach
    `model.generate` (max_new_tokens, num_beams, ...).
    """
    from ..data.manifests import load_records
    from ..tasks import UNTAGGED, resolve_kinds, score_records, transcription_scores

    manifest = load_records(manifest_or_records, on_error=on_error).select(limit)
    records = list(manifest)
    kinds = resolve_kinds(records, task_metrics)
    started = time.perf_counter()
    hypotheses = transcribe_records(model, processor, records, batch_size, prompt, task_prompts, progress,
                                    tokens_per_second, kinds, task_schemas, joint_ctc_weight, prefer_quoted,
                                    **generate_kwargs)
    elapsed = time.perf_counter() - started
    references = [record["text"] for record in records]
    per_task = bool(kinds) and kinds != {UNTAGGED: "transcription"}
    if per_task:
        metrics = dict(transcription_scores(records, hypotheses, kinds, normalize) or {})
        metrics["n_utterances"] = len(records)
    else:
        metrics = word_error_rate(references, hypotheses, normalize=normalize)
    audio_seconds = sum(record["duration"] or 0.0 for record in records)
    metrics.update(
        n_skipped=len(manifest.skipped),
        elapsed_seconds=elapsed,
        audio_seconds=audio_seconds,
        real_time_factor=elapsed / audio_seconds if audio_seconds else math.nan,
    )
    if per_task:
        metrics["tasks"] = score_records(records, hypotheses, kinds, normalize)
    if output_dir is not None:
        output_dir = Path(output_dir)
        if per_task:
            rows = _task_rows(records, hypotheses, kinds, normalize)
        else:
            rows = per_utterance_rows([r["id"] for r in records], references, hypotheses, normalize=normalize)
        write_jsonl(rows, output_dir / "predictions.jsonl")
        with open(output_dir / "metrics.json", "w", encoding="utf-8") as handle:
            json.dump(json_safe(metrics), handle, indent=2)
        notes = [f"Model: {model_name or type(model).__name__}", f"Data: {manifest.source}",
                 f"Normaliser: {normalizer_description(normalize)}"]  # fmt: skip
        report = format_report(metrics, "Evaluation", notes)
        (output_dir / "summary.md").write_text(report, encoding="utf-8")
    return metrics


def _task_rows(records, hypotheses, kinds, normalize) -> list[dict[str, Any]]:
    """Per-utterance rows of every task, back in record order, each naming its task and metric kind."""
    from ..tasks import group_by_task, task_rows

    rows: list[dict[str, Any] | None] = [None] * len(records)
    for task, indices in group_by_task(records).items():
        scored = task_rows(kinds[task], [records[i]["id"] for i in indices], [records[i]["text"] for i in indices],
                           [hypotheses[i] for i in indices], normalize)
        for index, row in zip(indices, scored):
            rows[index] = {"id": row.pop("id"), "task": task, "kind": kinds[task], **row}
    return rows

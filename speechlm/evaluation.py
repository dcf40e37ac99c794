"""Word and character error rates, per-utterance reports, a markdown summary, and model evaluation.

Alignment is jiwer's (Levenshtein over words, then over characters). Kept import-light: no torch, and jiwer is
imported on first use, so that `speechlm --help` and the server's startup do not pay for it. `evaluate_model` and
the `speechlm evaluate` subcommand import the model code inside the functions for the same reason.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "build_normalizer",
    "evaluate_model",
    "format_report",
    "format_summary_table",
    "json_safe",
    "normalize_text",
    "normalizer_description",
    "per_utterance_rows",
    "transcribe_records",
    "word_error_rate",
    "write_jsonl",
]

# Typographic apostrophes and look-alikes, so "don’t" (as LLMs and word processors write it) matches "don't".
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'"})


def normalize_text(text: str) -> str:
    """A deliberately small English normaliser, so that WER counts recognition errors rather than formatting.

    In order: Unicode NFKC (full-width and ligature forms become plain ones), typographic apostrophes become `'`,
    lowercase, every punctuation, symbol or control character becomes a space except an apostrophe between two
    letters or digits ("don't", "o'clock" are kept; the quotes in "'hello'" and the apostrophe of "dogs'" are not),
    and whitespace runs collapse to one space.

    Nothing else: numbers are not converted ("10" and "ten" differ), contractions are not expanded ("don't" and
    "do not" differ), spellings are not unified ("colour"/"color"), and a hyphen or decimal point splits a token
    ("well-known" -> "well known", "3.5" -> "3 5"). Use the same normaliser on both sides; for comparisons with
    published numbers, check which normaliser they used (Whisper's is much more aggressive).
    """
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    characters = []
    for index, character in enumerate(text):
        if character == "'":
            inside_word = 0 < index < len(text) - 1 and text[index - 1].isalnum() and text[index + 1].isalnum()
            characters.append(character if inside_word else " ")
        elif unicodedata.category(character)[0] in "PSCZ":  # punctuation, symbols, control/format, separators
            characters.append(" ")
        else:
            characters.append(character)
    return " ".join("".join(characters).split())


def _as_list(texts: str | Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{index}] must be a string, got {type(text).__name__}")
    return texts


def _prepare(references: str | Sequence[str], hypotheses: str | Sequence[str], normalize: bool | Callable):
    references, hypotheses = _as_list(references, "references"), _as_list(hypotheses, "hypotheses")
    if len(references) != len(hypotheses):
        raise ValueError(f"got {len(references)} references but {len(hypotheses)} hypotheses; they must pair up")
    if callable(normalize):
        clean = lambda text: " ".join(normalize(text).split())  # noqa: E731
    else:
        clean = normalize_text if normalize else (lambda text: " ".join(text.split()))
    return [clean(text) for text in references], [clean(text) for text in hypotheses]


def _rate(errors: int, n_reference: int) -> float:
    # With no reference words the rate is undefined: 0.0 when nothing was hypothesised either, inf otherwise (any
    # finite number would hide that a silent clip was "transcribed").
    if n_reference == 0:
        return 0.0 if errors == 0 else math.inf
    return errors / n_reference


def _error_counts(references: list[str], hypotheses: list[str]) -> dict[str, Any]:
    """Corpus-level counts over already-cleaned texts; empty references are counted here, not handed to jiwer.

    jiwer 3 rejects empty references and jiwer 4 reports a raw insertion count as their "WER"; for an empty
    reference every hypothesis word (character) is simply an insertion.
    """
    import jiwer

    pairs = [(ref, hyp) for ref, hyp in zip(references, hypotheses) if ref]
    counts = dict(substitutions=0, deletions=0, insertions=0, hits=0, char_errors=0, n_ref_chars=0)
    for ref, hyp in zip(references, hypotheses):
        if not ref and hyp:
            counts["insertions"] += len(hyp.split())
            counts["char_errors"] += len(hyp)
    if pairs:
        refs, hyps = [ref for ref, _ in pairs], [hyp for _, hyp in pairs]
        words = jiwer.process_words(refs, hyps)
        chars = jiwer.process_characters(refs, hyps)
        counts["substitutions"] += words.substitutions
        counts["deletions"] += words.deletions
        counts["insertions"] += words.insertions
        counts["hits"] += words.hits
        counts["char_errors"] += chars.substitutions + chars.deletions + chars.insertions
        counts["n_ref_chars"] += chars.hits + chars.substitutions + chars.deletions
    return counts


def word_error_rate(
    references: str | Sequence[str], hypotheses: str | Sequence[str], normalize: bool | Callable[[str], str] = True
) -> dict[str, Any]:
    """Corpus WER and CER of `hypotheses` against `references` (errors summed over utterances, not averaged).

    Returns `wer`, `cer`, `substitutions`, `deletions`, `insertions`, `hits` (word counts), `n_ref_words`,
    `n_ref_chars` and `n_utterances`. With `normalize`, both sides go through `normalize_text` first (or through
    `normalize` itself when it is a function, e.g. `build_normalizer("whisper")`); otherwise only whitespace is
    collapsed. An empty reference contributes its hypothesis words as insertions; when the whole corpus
    has no reference words the rates are 0.0 if the hypotheses are empty too, else `inf`.
    """
    references, hypotheses = _prepare(references, hypotheses, normalize)
    counts = _error_counts(references, hypotheses)
    n_ref_words = counts["hits"] + counts["substitutions"] + counts["deletions"]
    word_errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    return {
        "wer": _rate(word_errors, n_ref_words),
        "cer": _rate(counts["char_errors"], counts["n_ref_chars"]),
        "substitutions": counts["substitutions"],
        "deletions": counts["deletions"],
        "insertions": counts["insertions"],
        "hits": counts["hits"],
        "n_ref_words": n_ref_words,
        "n_ref_chars": counts["n_ref_chars"],
        "n_utterances": len(references),
    }


def per_utterance_rows(
    ids: Sequence[Any], references: Sequence[str], hypotheses: Sequence[str],
    normalize: bool | Callable[[str], str] = True,
) -> list[dict[str, Any]]:
    """One row per utterance (`id`, `ref`, `hyp` as given, then its `wer`, `cer` and error counts), for error analysis.

    The rates are computed like `word_error_rate` on that utterance alone.
    """
    ids = list(ids)
    if not (len(ids) == len(references) == len(hypotheses)):
        raise ValueError(
            f"got {len(ids)} ids, {len(references)} references and {len(hypotheses)} hypotheses; they must pair up"
        )
    rows = []
    for utterance_id, reference, hypothesis in zip(ids, references, hypotheses):
        metrics = word_error_rate(reference, hypothesis, normalize=normalize)
        rows.append(
            {
                "id": utterance_id,
                "ref": reference,
                "hyp": hypothesis,
                "wer": metrics["wer"],
                "cer": metrics["cer"],
                "substitutions": metrics["substitutions"],
                "deletions": metrics["deletions"],
                "insertions": metrics["insertions"],
                "n_ref_words": metrics["n_ref_words"],
            }
        )
    return rows


def json_safe(value: Any) -> Any:
    """NaN/inf become null: Python's json would write `Infinity`, which strict JSON readers (jq, browsers) reject.

    The one helper for every JSON file SpeechLM writes (metrics, predictions, training summaries)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write `rows` as UTF-8 JSON Lines (non-finite numbers as null), creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(json_safe(row), ensure_ascii=False, allow_nan=False) + "\n")
    return path


_LABELS = {
    "kind": "Metric kind",
    "loss": "Loss",
    "wer": "WER",
    "cer": "CER",
    "substitutions": "Substitutions",
    "deletions": "Deletions",
    "insertions": "Insertions",
    "hits": "Correct words",
    "n_ref_words": "Reference words",
    "n_ref_chars": "Reference characters",
    "n_utterances": "Utterances",
    "valid_json": "Valid JSON",
    "intent_accuracy": "Intent accuracy",
    "slot_precision": "Slot precision",
    "slot_recall": "Slot recall",
    "slot_f1": "Slot F1",
    "frame_accuracy": "Frame accuracy (intent and every slot)",
    "slot_hits": "Correct slots",
    "slot_predicted": "Predicted slots",
    "slot_reference": "Reference slots",
    "exact_match": "Exact match",
    "token_f1": "Token F1",
    "n_exact": "Exact answers",
}
_RATES = {"wer", "cer", "valid_json", "intent_accuracy", "slot_precision", "slot_recall", "slot_f1", "frame_accuracy",
          "exact_match", "token_f1"}


def _format_value(key: str, value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a" if math.isnan(value) else "inf"
    if any(key == rate or key.endswith(f"_{rate}") for rate in _RATES) and isinstance(value, (int, float)):
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_summary_table(metrics: dict[str, Any], title: str) -> str:
    """`metrics` as a two-column markdown table under a `### title` heading; rates in percent, known keys first.

    Nested dicts (`evaluate_model`'s per-task `tasks`) are left out: `format_report` gives each its own table.
    """
    metrics = {key: value for key, value in metrics.items() if not isinstance(value, dict)}
    keys = [key for key in _LABELS if key in metrics] + [key for key in metrics if key not in _LABELS]
    lines = [f"### {title}", "", "| Metric | Value |", "| --- | ---: |"]
    for key in keys:
        lines.append(f"| {_cell(_LABELS.get(key, str(key)))} | {_cell(_format_value(key, metrics[key]))} |")
    return "\n".join(lines) + "\n"


def format_report(metrics: dict[str, Any], title: str, notes: Sequence[str] = ()) -> str:
    """`evaluate_model`'s metrics as markdown: `notes` as a list, the overall table (transcription WER, timing), then
    one table per task when there are several tasks."""
    parts = [f"## {title}", ""]
    if notes:
        parts += [f"- {note}" for note in notes] + [""]
    tasks = metrics.get("tasks") or {}
    overall = "Overall (WER/CER over transcription tasks only)" if tasks else "Overall"
    parts.append(format_summary_table(metrics, overall))
    for task, values in tasks.items():
        parts.append(format_summary_table(values, f"Task {task} ({values['kind']})"))
    return "\n".join(parts)


NORMALIZERS = ("speechlm", "whisper", "none")
# Where Whisper's American-spelling mapping may already be on disk: openai-whisper and whisper-normalizer bundle it.
_SPELLING_PACKAGES = (("whisper", "normalizers/english.json"), ("whisper_normalizer", "english.json"))
_SPELLING_REPO = "openai/whisper-tiny.en"


def build_normalizer(name: str = "speechlm", spelling: str | None = None) -> bool | Callable[[str], str]:
    """The `normalize` argument of the scorers for a normaliser name: "speechlm" (`normalize_text`, True), "none"
    (False) or "whisper": transformers' Whisper `EnglishTextNormalizer`, the one the Open ASR Leaderboard scores with
    (numbers as digits, contractions expanded, fillers dropped, British spellings made American), so that WER can be
    set beside published figures.

    The spelling mapping comes from `spelling` (a `normalizer.json`/`english.json` file, a Whisper checkpoint folder
    holding `normalizer.json`, a Hub model id, or "none" for no mapping), else from an installed openai-whisper or
    whisper-normalizer package, else from the Hub's openai/whisper-tiny.en (the Hugging Face cache, so it works
    offline once fetched); a ValueError says how to provide it when none is reachable.
    """
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normaliser {name!r}; choose one of {', '.join(NORMALIZERS)}")
    if name != "whisper":
        return name == "speechlm"
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping, source = _spelling_mapping(spelling)
    normalizer = EnglishTextNormalizer(mapping)

    def whisper_english(text: str) -> str:
        return normalizer(text)

    whisper_english.description = (f"Whisper EnglishTextNormalizer (transformers; the Open ASR Leaderboard's), "
                                   f"{len(mapping)} spellings from {source}")  # fmt: skip
    return whisper_english


def _spelling_mapping(spelling: str | None) -> tuple[dict[str, str], str]:
    import importlib.util

    if spelling == "none":
        return {}, "nowhere (no spelling mapping)"
    candidates = []
    if spelling is not None and Path(spelling).exists():
        path = Path(spelling)
        candidates.append(path / "normalizer.json" if path.is_dir() else path)
    elif spelling is None:
        for package, relative in _SPELLING_PACKAGES:
            spec = importlib.util.find_spec(package)
            for root in (spec.submodule_search_locations or []) if spec else []:
                candidates.append(Path(root) / relative)
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")), str(path)
    repo = spelling or _SPELLING_REPO
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, "normalizer.json")
    except Exception as error:  # offline, no such repo, no such file: all mean "not reachable from here"
        raise ValueError(
            f"no English spelling mapping for the Whisper normaliser ({type(error).__name__} for {repo}/normalizer.json"
            f"{'' if spelling else ', and neither openai-whisper nor whisper-normalizer is installed'}): pass a "
            "normalizer.json file or a Whisper checkpoint folder (--whisper-spelling PATH), or 'none' for no mapping"
        ) from None
    return json.loads(Path(path).read_text(encoding="utf-8")), f"{repo}/normalizer.json"


def normalizer_description(normalize: bool | Callable[[str], str]) -> str:
    """How texts were normalised before scoring, for reports (a number means little without it)."""
    if callable(normalize):
        return getattr(normalize, "description", None) or getattr(normalize, "__name__", type(normalize).__name__)
    return "speechlm normalize_text" if normalize else "none (whitespace collapsed only)"


# --------------------------------------------------------------------------------------------------------------------
# Model evaluation

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
    **generate_kwargs,
) -> list[str]:
    """Hypotheses for manifest records (see `speechlm.data`), in record order, through `transcribe_arrays`.

    A record's own `prompt` wins, then its `task`'s prompt from `task_prompts`, then `prompt`, then the processor's
    default. A chat record (`messages`) is answered from its conversation up to its last assistant message (that
    message is its reference) through the processor's chat path, stopping at the end-of-turn token.
    """
    from tqdm.auto import tqdm

    from .data import load_record_audio, resolve_prompt
    from .inference.decoding import transcribe_arrays

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
            texts = dict(zip(plain, transcribe_arrays(model, processor, audios, prompt=prompts,
                                                      batch_size=batch_size, **generate_kwargs)))
            if chats:
                conversations = [_chat_history(chunk[i], processor.sampling_rate) for i in chats]
                texts.update(zip(chats, _answer_chats(model, processor, conversations, batch_size, **generate_kwargs)))
            hypotheses += [texts[i] for i in range(len(chunk))]
            bar.update(len(chunk))
    return hypotheses


def _chat_history(record: dict[str, Any], sampling_rate: int) -> list[dict[str, Any]]:
    """A chat record's messages before its last assistant message (its reference), every clip decoded."""
    from .chat import AudioPart, load_clip

    messages = list(record["messages"])
    last = max(i for i, message in enumerate(messages) if message.role == "assistant")
    return [{"role": message.role,
             "content": [{"type": "audio", "audio": load_clip(part, sampling_rate), "sampling_rate": sampling_rate}
                         if isinstance(part, AudioPart) else {"type": "text", "text": part} for part in message.parts]}
            for message in messages[:last]]  # fmt: skip


def _answer_chats(model, processor, conversations: list, batch_size: int, **generate_kwargs) -> list[str]:
    import torch

    from .inference.decoding import default_generation_kwargs

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
    `generate_kwargs` reach `model.generate` (max_new_tokens, num_beams, ...).
    """
    from .data import load_records
    from .tasks import UNTAGGED, resolve_kinds, score_records, transcription_scores

    manifest = load_records(manifest_or_records, on_error=on_error).select(limit)
    records = list(manifest)
    kinds = resolve_kinds(records, task_metrics)
    started = time.perf_counter()
    hypotheses = transcribe_records(model, processor, records, batch_size, prompt, task_prompts, progress,
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
    from .tasks import group_by_task, task_rows

    rows: list[dict[str, Any] | None] = [None] * len(records)
    for task, indices in group_by_task(records).items():
        scored = task_rows(kinds[task], [records[i]["id"] for i in indices], [records[i]["text"] for i in indices],
                           [hypotheses[i] for i in indices], normalize)
        for index, row in zip(indices, scored):
            rows[index] = {"id": row.pop("id"), "task": task, "kind": kinds[task], **row}
    return rows


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """`speechlm evaluate`'s flags: the shared model and decoding options (`speechlm.cli_options`) plus its own."""
    from .cli_options import add_decoding_arguments, add_model_arguments

    parser.add_argument("manifest", help="JSONL manifest: {\"audio\": path, \"text\": reference, \"prompt\"?: ...}")
    add_model_arguments(parser)
    add_decoding_arguments(parser, prompt_help="instruction for records without their own prompt (default: the "
                                               "processor's)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N utterances (default: all)")
    parser.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                        help="bad manifest lines: stop with a list of them, or skip them (counted and reported)")
    parser.add_argument("--output-dir", default=None,
                        help="write predictions.jsonl, metrics.json and summary.md here (default: print only)")
    parser.add_argument("--no-normalize", action="store_true", help="score raw text (same as --normalizer none)")
    parser.add_argument("--normalizer", choices=NORMALIZERS, default="speechlm",
                        help="speechlm (ours, light), whisper (the Open ASR Leaderboard's) or none (default: speechlm)")
    parser.add_argument("--whisper-spelling", default=None, metavar="PATH|MODEL|none",
                        help="the Whisper normaliser's spelling mapping: a normalizer.json, a Whisper checkpoint "
                             "folder or Hub id, or none (default: openai-whisper if installed, else the HF cache)")
    parser.add_argument("--task-metric", action="append", default=[], metavar="TASK=KIND",
                        help="score TASK as transcription, json or answer (default: inferred; see speechlm.tasks)")
    parser.add_argument("--task-prompt", action="append", default=[], metavar="TASK=PROMPT",
                        help="instruction for records of TASK that carry no prompt of their own (default: the "
                             "model's config.yaml, else --prompt)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_evaluate(args: argparse.Namespace) -> int:
    from .cli_options import generation_options, load_or_explain
    from .data import ManifestError, read_manifest

    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    try:  # read (and check) the manifest and the task options before spending time on loading the model
        manifest = read_manifest(args.manifest, on_error=args.on_error)
        task_prompts, task_metrics = _task_options(args, manifest)
        normalize = build_normalizer("none" if args.no_normalize else args.normalizer, args.whisper_spelling)
    except (ManifestError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if (loaded := load_or_explain(args)) is None:
        return 2
    processor, model = loaded
    metrics = evaluate_model(
        model, processor, manifest, batch_size=args.batch_size, prompt=args.prompt, output_dir=args.output_dir,
        limit=args.limit, normalize=normalize, progress=not args.quiet, task_metrics=task_metrics,
        task_prompts=task_prompts or None, model_name=args.model, **generation_options(args),
    )  # fmt: skip
    notes = [f"Normaliser: {normalizer_description(normalize)}"]
    print(format_report(metrics, f"{args.model} on {args.manifest}", notes))
    if "wer" in metrics:
        print(f"WER: {_format_value('wer', metrics['wer'])}  CER: {_format_value('cer', metrics['cer'])}")
    for task, values in (metrics.get("tasks") or {}).items():
        from .tasks import HEADLINE

        scores = "  ".join(f"{_LABELS[key]}: {_format_value(key, values[key])}" for key in HEADLINE[values["kind"]])
        print(f"{task} ({values['kind']}): {scores}")
    return 0


def _task_options(args: argparse.Namespace, records) -> tuple[dict[str, str], dict[str, str]]:
    """(task_prompts, task_metrics): the training run's own (`config.yaml` in the model folder, written by `speechlm
    train`), overridden per task by `--task-prompt` / `--task-metric`; every task of `records` must get a prompt."""
    from .data import resolve_prompt
    from .tasks import parse_task_metrics, resolve_kinds

    task_prompts, task_metrics = {}, {}
    trained = Path(args.model) / "config.yaml"
    if trained.is_file():
        import yaml

        config = yaml.safe_load(trained.read_text(encoding="utf-8")) or {}
        task_prompts.update((config.get("data") or {}).get("task_prompts") or {})
        task_metrics.update((config.get("evaluation") or {}).get("task_metrics") or {})
    for item in args.task_prompt:
        task, sep, prompt = item.partition("=")
        if not sep or not task.strip():
            raise ValueError(f"--task-prompt expects TASK=PROMPT, got {item!r}")
        task_prompts[task.strip()] = prompt
    task_metrics.update(parse_task_metrics(args.task_metric))
    resolve_kinds(records, task_metrics)  # a json task with non-JSON references: said before the model loads
    untold = set()
    for record in records:
        try:
            own = resolve_prompt(record, task_prompts)
            if own is None and record.get("task") is not None and record.get("messages") is None:
                untold.add(record["task"])
        except KeyError as error:
            raise ValueError(f"{error.args[0]}: give it with --task-prompt TASK=PROMPT") from None
    if untold:
        print(f"warning: task(s) {', '.join(sorted(untold))} have no prompt (no --task-prompt, none in the model's "
              "config.yaml, none in the rows): they are decoded with the default prompt", file=sys.stderr)
    return task_prompts, task_metrics


add_arguments = add_evaluate_arguments
run = run_evaluate

"""What evaluation writes: strict JSON (non-finite numbers as null), JSON Lines, markdown summary tables."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


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


LABELS = {
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


def format_value(key: str, value: Any) -> str:
    """One metric for people: rates in percent, non-finite numbers as inf or n/a, floats to 4 significant digits."""
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
    keys = [key for key in LABELS if key in metrics] + [key for key in metrics if key not in LABELS]
    lines = [f"### {title}", "", "| Metric | Value |", "| --- | ---: |"]
    for key in keys:
        lines.append(f"| {_cell(LABELS.get(key, str(key)))} | {_cell(format_value(key, metrics[key]))} |")
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

"""Word and character error rates, per-utterance reports, a markdown summary, and model evaluation.

The package, one concept a module:

- `normalizers`: `normalize_text` (ours, light) and `build_normalizer` ("speechlm", "whisper": the Open ASR
  Leaderboard's, "none"), `normalizer_description` for reports;
- `metrics`: `word_error_rate` (corpus WER/CER, jiwer's alignment) and `per_utterance_rows`;
- `outputs`: `json_safe`, `write_jsonl`, the markdown `format_summary_table` / `format_report`;
- `evaluate`: `transcribe_records` and `evaluate_model` (decode a manifest through the shared loop, score it per task);
- `cli`: `speechlm evaluate`.

Kept import-light: no torch, and jiwer is imported on first use, so that `speechlm --help` and the server's startup
do not pay for it; `evaluate` and `cli` import the model code inside their functions for the same reason. Every name
is also importable from here (`from speechlm.evaluation import word_error_rate`), resolved on first use.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_HOMES = {
    "speechlm.evaluation.normalizers": (
        "NORMALIZERS", "build_normalizer", "normalize_text", "normalizer_description",
    ),
    "speechlm.evaluation.metrics": ("as_list", "per_utterance_rows", "word_error_rate"),
    "speechlm.evaluation.outputs": ("format_report", "format_summary_table", "json_safe", "write_jsonl"),
    "speechlm.evaluation.evaluate": ("evaluate_model", "transcribe_records"),
    "speechlm.evaluation.cli": ("add_evaluate_arguments", "run_evaluate", "add_arguments", "run"),
}  # fmt: skip
_WHERE, __getattr__, __dir__ = lazy_exports(__name__, globals(), _HOMES)

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


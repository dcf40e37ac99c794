"""What evaluation writes: JSON Lines (UTF-8, strict JSON) and the markdown summary table."""

from __future__ import annotations

import json

from speechlm.evaluation.metrics import per_utterance_rows, word_error_rate
from speechlm.evaluation.outputs import format_summary_table, write_jsonl


def test_write_jsonl_is_utf8_and_strict_json(tmp_path):
    rows = per_utterance_rows(["u1", "u2", "u3"], ["The cat.", "a b c d", ""], ["the cat", "a b", "¡hola!"])
    path = write_jsonl(rows, tmp_path / "reports" / "utterances.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and "¡hola!" in lines[2]  # UTF-8, not \u escapes
    loaded = [json.loads(line) for line in lines]
    assert loaded[1] == rows[1]
    assert loaded[2]["wer"] is None  # strict JSON: no Infinity


def test_format_summary_table():
    metrics = word_error_rate(["a b c d"], ["a x c"])
    table = format_summary_table({**metrics, "model": "tiny|model"}, "LibriSpeech test-clean")
    assert table.splitlines()[:5] == [
        "### LibriSpeech test-clean",
        "",
        "| Metric | Value |",
        "| --- | ---: |",
        "| WER | 50.00% |",
    ]
    assert "| Deletions | 1 |" in table and "| Reference words | 4 |" in table
    assert table.rstrip().endswith("| model | tiny\\|model |")  # unknown keys last, pipes escaped
    assert "| WER | inf |" in format_summary_table(word_error_rate([""], ["x"]), "silence")

"""`evaluate_model` and `speechlm evaluate`: the shared decoding loop, per-record prompts, reports, skipped lines."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
import torch

from speechlm import cli
from speechlm.evaluation import evaluate_model, word_error_rate
from speechlm.inference import transcribe_arrays
from tests.conftest import make_clips

GENERATE = {"max_new_tokens": 4}


@pytest.fixture
def manifest(tmp_path):
    rows = []
    for index, clip in enumerate(make_clips()):
        sf.write(tmp_path / f"{index}.wav", clip, 16000)
        rows.append({"audio": f"{index}.wav", "text": f"call mom {index}", "id": f"u{index}"})
    rows[2]["prompt"] = "spell it"
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_evaluate_model_uses_the_shared_decoding_loop(build, manifest, tmp_path):
    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    clips = make_clips()
    expected = transcribe_arrays(model, processor, clips, prompt=["transcribe", "transcribe", "spell it"],
                                 batch_size=2, **GENERATE)
    metrics = evaluate_model(model, processor, manifest, batch_size=2, output_dir=tmp_path / "report", **GENERATE)
    references = ["call mom 0", "call mom 1", "call mom 2"]
    assert metrics["wer"] == word_error_rate(references, expected)["wer"]
    assert metrics["n_utterances"] == 3 and metrics["n_skipped"] == 0
    assert metrics["audio_seconds"] == pytest.approx(0.55 + 0.3 + 0.8, abs=1e-3)
    rows = [json.loads(line) for line in (tmp_path / "report" / "predictions.jsonl").read_text().splitlines()]
    assert [row["hyp"] for row in rows] == expected and [row["id"] for row in rows] == ["u0", "u1", "u2"]
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["n_utterances"] == 3
    assert "| WER |" in (tmp_path / "report" / "summary.md").read_text()

    # The `prompt` argument replaces the processor's default, not a record's own prompt.
    other = transcribe_arrays(model, processor, clips, prompt=["other", "other", "spell it"], **GENERATE)
    records = [{"audio": clip, "sampling_rate": 16000, "text": ref} for clip, ref in zip(clips, references)]
    records[2]["prompt"] = "spell it"
    metrics = evaluate_model(model, processor, records, prompt="other", **GENERATE)
    assert metrics["wer"] == word_error_rate(references, other)["wer"]


def test_speechlm_evaluate_prints_wer_and_counts_skipped_lines(build, manifest, tmp_path, capsys):
    processor, model = build("wav2vec2-layer", "qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    with open(manifest, "a") as handle:
        handle.write('{"audio": "missing.wav", "text": "gone"}\n')
    argv = ["evaluate", str(manifest), "--model", str(tmp_path / "model"), "--max-new-tokens", "3", "--quiet"]
    assert cli.main(argv) == 2
    assert "eval.jsonl:4: audio file not found" in capsys.readouterr().err
    assert cli.main([*argv, "--on-error", "skip", "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "WER: " in out and "| Utterances | 3 |" in out and "| n_skipped | 1 |" in out
    assert (tmp_path / "out" / "predictions.jsonl").is_file()

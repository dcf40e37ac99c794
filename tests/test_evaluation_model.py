"""`evaluate_model` and `speechlm evaluate`: the shared decoding loop, per-record prompts, reports, skipped lines."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
import torch

from speechlm import cli
from speechlm.evaluation import evaluate_model, word_error_rate
from speechlm.inference import transcribe_arrays
from speechlm.tasks import score_json
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


SLU = '{"intent": "call", "contact": "mom"}'
PROMPTS = {"transcribe": "transcribe", "slu": "intent as json"}


@pytest.fixture
def two_task_manifest(tmp_path):
    rows = []
    for index, clip in enumerate(make_clips(seconds=(0.55, 0.3, 0.8, 0.4))):
        sf.write(tmp_path / f"{index}.wav", clip, 16000)
        task = "transcribe" if index % 2 == 0 else "slu"
        rows.append({"audio": f"{index}.wav", "text": "call mom" if task == "transcribe" else SLU, "task": task,
                     "id": f"u{index}"})
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_evaluate_model_scores_each_task_with_its_own_prompt_and_kind(build, two_task_manifest, tmp_path):
    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    clips = make_clips(seconds=(0.55, 0.3, 0.8, 0.4))
    prompts = [PROMPTS["transcribe"], PROMPTS["slu"]] * 2
    expected = transcribe_arrays(model, processor, clips, prompt=prompts, batch_size=2, **GENERATE)
    metrics = evaluate_model(model, processor, two_task_manifest, batch_size=2, task_prompts=PROMPTS,
                             output_dir=tmp_path / "report", model_name="tiny", **GENERATE)
    assert {task: values["kind"] for task, values in metrics["tasks"].items()} == {"transcribe": "transcription",
                                                                                   "slu": "json"}
    assert metrics["wer"] == word_error_rate(["call mom"] * 2, expected[0::2])["wer"]  # transcription rows only
    assert metrics["n_utterances"] == 4 and metrics["tasks"]["slu"]["n_utterances"] == 2
    assert metrics["tasks"]["slu"] == {"kind": "json", **score_json([SLU] * 2, expected[1::2])}
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(saved["tasks"]) == {"transcribe", "slu"}
    rows = [json.loads(line) for line in (tmp_path / "report" / "predictions.jsonl").read_text().splitlines()]
    assert [(row["id"], row["task"], row["kind"]) for row in rows] == [
        ("u0", "transcribe", "transcription"), ("u1", "slu", "json"), ("u2", "transcribe", "transcription"),
        ("u3", "slu", "json")]  # fmt: skip
    assert [row["hyp"] for row in rows] == expected
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "### Task slu (json)" in summary and "| Valid JSON |" in summary and "- Model: tiny" in summary


def test_explicit_task_metric_overrides_inference(build, two_task_manifest):
    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    metrics = evaluate_model(model, processor, two_task_manifest, task_prompts=PROMPTS,
                             task_metrics={"slu": "answer"}, **GENERATE)
    assert metrics["tasks"]["slu"]["kind"] == "answer" and "exact_match" in metrics["tasks"]["slu"]


def test_speechlm_evaluate_prints_each_task(build, two_task_manifest, tmp_path, capsys):
    processor, model = build("wav2vec2-layer", "qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    argv = ["evaluate", str(two_task_manifest), "--model", str(tmp_path / "model"), "--max-new-tokens", "3", "--quiet",
            "--task-prompt", "slu=intent as json"]  # fmt: skip
    assert cli.main(argv) == 2  # the transcribe task has no prompt: said before the model loads
    assert "task 'transcribe' has no prompt" in capsys.readouterr().err
    assert cli.main([*argv, "--task-prompt", "transcribe=transcribe", "--task-metric", "slu=answer"]) == 0
    out = capsys.readouterr().out
    assert "WER: " in out and "slu (answer): Exact match: " in out and "### Task transcribe (transcription)" in out


def test_speechlm_evaluate_names_the_whisper_normaliser(build, manifest, tmp_path, capsys):
    processor, model = build("wav2vec2-layer", "qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "spelling.json").write_text(json.dumps({"mum": "mom"}))
    argv = ["evaluate", str(manifest), "--model", str(tmp_path / "model"), "--max-new-tokens", "3", "--quiet",
            "--normalizer", "whisper", "--whisper-spelling", str(tmp_path / "spelling.json"),
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 0
    assert "- Normaliser: Whisper EnglishTextNormalizer" in capsys.readouterr().out
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"- Model: {tmp_path / 'model'}" in summary and "Normaliser: Whisper EnglishTextNormalizer" in summary


def test_chat_rows_are_answered_from_their_conversation(build, tmp_path):
    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    clip = make_clips()[0]
    sf.write(tmp_path / "0.wav", clip, 16000)
    chat = {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "0.wav"},
                                                      {"type": "text", "text": "who is called?"}]},
                         {"role": "assistant", "content": "mom"}], "task": "qa", "id": "c0"}  # fmt: skip
    plain = {"audio": "0.wav", "text": "call mom", "task": "transcribe", "id": "p0"}
    (tmp_path / "chat.jsonl").write_text(json.dumps(plain) + "\n" + json.dumps(chat) + "\n")
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": clip, "sampling_rate": 16000},
                                                 {"type": "text", "text": "who is called?"}]}]  # fmt: skip
    inputs = processor.apply_chat_template([conversation])
    expected = processor.batch_decode(model.generate(**inputs, eos_token_id=processor.end_of_turn_token_ids,
                                                     do_sample=False, **GENERATE))  # fmt: skip
    metrics = evaluate_model(model, processor, tmp_path / "chat.jsonl", task_prompts={"transcribe": "transcribe"},
                             output_dir=tmp_path / "out", **GENERATE)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert rows[1]["hyp"] == expected[0] and rows[1]["ref"] == "mom" and rows[1]["kind"] == "answer"
    assert metrics["tasks"]["qa"]["n_utterances"] == 1 and metrics["tasks"]["transcribe"]["n_utterances"] == 1

"""`evaluate_model`: the shared decoding loop, per-record prompts, per-task scoring, chat rows, reports."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
import torch

from speechlm.evaluation.evaluate import evaluate_model
from speechlm.evaluation.metrics import word_error_rate
from speechlm.inference import transcribe_arrays
from speechlm.tasks import score_json
from tests.conftest import make_clips
from tests.evaluation.conftest import GENERATE, PROMPTS, SLU

SLU_SCHEMA = {"type": "object", "properties": {"intent": {"enum": ["call"]}, "contact": {"enum": ["mom", "dad"]}},
              "required": ["intent", "contact"], "additionalProperties": False,
              "x-guidance": {"whitespace_flexible": False}}
TRANSCRIPT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["transcript", "intent"],
                     "properties": {"transcript": {"type": "string", "maxLength": 12}, "intent": {"enum": ["call"]}},
                     "x-guidance": {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}}


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


def test_the_length_cap_applies_to_transcription_rows_only(build, two_task_manifest, tmp_path):
    # An answer (JSON frame, reply) may be longer than the audio; a transcript may not.
    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    clips = make_clips(seconds=(0.55, 0.3, 0.8, 0.4))
    forced = {"min_new_tokens": 30, "max_new_tokens": 30}
    evaluate_model(model, processor, two_task_manifest, batch_size=2, task_prompts=PROMPTS, tokens_per_second=1.0,
                   output_dir=tmp_path / "report", **forced)
    rows = (tmp_path / "report" / "predictions.jsonl").read_text().splitlines()
    hyps = [json.loads(line)["hyp"] for line in rows]
    capped = transcribe_arrays(model, processor, clips[0::2], prompt=PROMPTS["transcribe"], tokens_per_second=1.0,
                               **forced)
    free = transcribe_arrays(model, processor, clips[1::2], prompt=PROMPTS["slu"], **forced)
    assert hyps[0::2] == capped and hyps[1::2] == free


def test_a_task_schema_holds_that_tasks_answers_only(build, two_task_manifest, tmp_path):
    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    clips = make_clips(seconds=(0.55, 0.3, 0.8, 0.4))
    options = {"max_new_tokens": 40}
    metrics = evaluate_model(model, processor, two_task_manifest, batch_size=2, task_prompts=PROMPTS,
                             task_schemas={"slu": SLU_SCHEMA}, output_dir=tmp_path / "report", **options)
    hyps = [json.loads(line)["hyp"] for line in (tmp_path / "report" / "predictions.jsonl").read_text().splitlines()]
    assert hyps[1::2] == transcribe_arrays(model, processor, clips[1::2], prompt=PROMPTS["slu"], json_schema=SLU_SCHEMA,
                                           **options)
    assert hyps[0::2] == transcribe_arrays(model, processor, clips[0::2], prompt=PROMPTS["transcribe"], **options)
    assert metrics["tasks"]["slu"]["valid_json"] == 1.0  # an untrained model, held to the schema


def test_explicit_task_metric_overrides_inference(build, two_task_manifest):
    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    metrics = evaluate_model(model, processor, two_task_manifest, task_prompts=PROMPTS,
                             task_metrics={"slu": "answer"}, **GENERATE)
    assert metrics["tasks"]["slu"]["kind"] == "answer" and "exact_match" in metrics["tasks"]["slu"]


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


def test_joint_ctc_decoding_applies_to_transcription_rows_only(build, two_task_manifest, tmp_path):
    # The CTC head reads the transcript; an SLU answer is another text, which it would only pull towards the words.
    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    clips = make_clips(seconds=(0.55, 0.3, 0.8, 0.4))
    options = {"max_new_tokens": 8}
    evaluate_model(model, processor, two_task_manifest, batch_size=2, task_prompts=PROMPTS, joint_ctc_weight=0.5,
                   output_dir=tmp_path / "report", **options)
    hyps = [json.loads(line)["hyp"] for line in (tmp_path / "report" / "predictions.jsonl").read_text().splitlines()]
    joint = transcribe_arrays(model, processor, clips[0::2], prompt=PROMPTS["transcribe"], joint_ctc_weight=0.5,
                              **options)
    assert joint != transcribe_arrays(model, processor, clips[0::2], prompt=PROMPTS["transcribe"], **options)
    assert hyps[0::2] == joint
    assert hyps[1::2] == transcribe_arrays(model, processor, clips[1::2], prompt=PROMPTS["slu"], **options)


def test_joint_ctc_decoding_reads_the_transcript_field_of_a_task_whose_schema_opens_with_one(build, two_task_manifest,
                                                                                             tmp_path):
    from speechlm.joint_ctc import schema_transcript_span

    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    clips = make_clips(seconds=(0.55, 0.3, 0.8, 0.4))[1::2]
    options = {"max_new_tokens": 24, "json_schema": TRANSCRIPT_SCHEMA}
    evaluate_model(model, processor, two_task_manifest, task_prompts=PROMPTS, task_schemas={"slu": TRANSCRIPT_SCHEMA},
                   joint_ctc_weight=0.9, output_dir=tmp_path / "report", max_new_tokens=24)
    hyps = [json.loads(line)["hyp"] for line in (tmp_path / "report" / "predictions.jsonl").read_text().splitlines()]
    span = schema_transcript_span(processor.tokenizer, TRANSCRIPT_SCHEMA)
    joint = transcribe_arrays(model, processor, clips, prompt=PROMPTS["slu"], joint_ctc_weight=0.9,
                              joint_ctc_span=span, **options)
    assert joint != transcribe_arrays(model, processor, clips, prompt=PROMPTS["slu"], **options)
    assert hyps[1::2] == joint


def test_prefer_quoted_chooses_among_a_quoting_tasks_beams_only(build, two_task_manifest, tmp_path):
    from tests.inference.test_structured import ROT

    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    clips = make_clips(seconds=(0.55, 0.3, 0.8, 0.4))
    options = {"max_new_tokens": 64, "num_beams": 4}
    evaluate_model(model, processor, two_task_manifest, task_prompts=PROMPTS, task_schemas={"slu": ROT},
                   prefer_quoted=True, output_dir=tmp_path / "report", **options)
    hyps = [json.loads(line)["hyp"] for line in (tmp_path / "report" / "predictions.jsonl").read_text().splitlines()]
    assert hyps[1::2] == transcribe_arrays(model, processor, clips[1::2], prompt=PROMPTS["slu"], json_schema=ROT,
                                           prefer_quoted=True, **options)
    assert hyps[1::2] != transcribe_arrays(model, processor, clips[1::2], prompt=PROMPTS["slu"], json_schema=ROT,
                                           **options)
    assert hyps[0::2] == transcribe_arrays(model, processor, clips[0::2], prompt=PROMPTS["transcribe"], **options)

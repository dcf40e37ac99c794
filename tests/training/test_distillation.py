"""Distillation against the text-only LLM: the teacher's rows, the pairing of their answer tokens with the model's,
the frozen teacher under LoRA, and the loss the trainer adds."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from speechlm.configuration import IGNORE_INDEX
from speechlm.data import SpeechLMCollator
from speechlm.training import SpeechLMTrainer
from speechlm.training.distillation import next_token_kl, teacher_logits
from tests.conftest import make_clips

TEXTS = ["hello world", "good day to you"]
TRANSCRIPTS = ["hello there world", "good day"]


def _items(processor, transcripts=TRANSCRIPTS):
    return [{"audio": clip, "text": text, "transcript": transcript}
            for clip, text, transcript in zip(make_clips((0.6, 0.9)), TEXTS, transcripts)]


def _arguments(tmp_path, steps: int = 1) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True)


def test_teacher_rows_read_the_transcript_where_the_clip_stands(build):
    processor, _ = build("whisper", "llama", layout="placeholder")
    batch = SpeechLMCollator(processor, distillation=True)(_items(processor))
    for row, (text, transcript) in enumerate(zip(TEXTS, TRANSCRIPTS)):
        ids = batch["teacher_input_ids"][row][batch["teacher_attention_mask"][row].bool()]
        expected = processor.encode_text([processor.build_prompt(audio_text=transcript)], [text])["input_ids"][0]
        assert ids.tolist() == expected.tolist()
        assert "<|audio|>" not in processor.tokenizer.decode(ids)


def test_teacher_rows_label_the_same_answer_tokens_as_the_model_rows(build):
    processor, _ = build("whisper", "llama")
    batch = SpeechLMCollator(processor, distillation=True)(_items(processor))
    for row in range(len(TEXTS)):
        student = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        teacher = batch["teacher_labels"][row][batch["teacher_labels"][row] != IGNORE_INDEX]
        assert student.tolist() == teacher.tolist()


def test_chat_rows_with_distillation_are_refused_by_name(build):
    processor, _ = build("whisper", "llama", layout="placeholder")
    chat = [{"role": "user", "content": [{"type": "audio", "audio": make_clips((0.5,))[0]}]},
            {"role": "assistant", "content": "hi"}]
    with pytest.raises(ValueError, match="distillation needs each example's transcript"):
        SpeechLMCollator(processor, distillation=True)([{"messages": chat, "text": "hi"}])


def test_an_understanding_example_without_its_transcript_is_refused_by_name(build):
    processor, _ = build("whisper", "llama")
    items = [{**item, "task": "slu", "id": f"clip-{i}"} for i, item in enumerate(_items(processor))]
    items[1]["transcript"] = None
    with pytest.raises(ValueError, match="clip-1: distillation needs the `transcript` of a 'slu' example"):
        SpeechLMCollator(processor, distillation=True)(items)


def test_kl_pairs_each_answer_token_whatever_comes_before_it():
    """The model's row has audio in front (and may keep only its last logits); the teacher's has the transcript:
    the KL compares the predictions of the same answer tokens, so equal predictions give zero."""
    torch.manual_seed(0)
    answer = torch.randn(4, 11)  # the logits that predict answer tokens 2..4 and EOS
    teacher_labels = torch.tensor([[IGNORE_INDEX] * 3 + [7, 8, 9, 2]])
    teacher = torch.cat([torch.randn(1, 2, 11), answer[None], torch.randn(1, 1, 11)], 1)  # after EOS: unused
    student_labels = torch.tensor([[IGNORE_INDEX] * 9 + [7, 8, 9, 2]])
    student = torch.cat([answer[None], torch.randn(1, 1, 11)], 1)  # only the last 5 positions kept
    assert next_token_kl(student, student_labels, teacher, teacher_labels).item() == pytest.approx(0.0, abs=1e-6)
    shifted = torch.cat([torch.randn(1, 1, 11), answer[None]], 1)  # the same logits one position late
    assert next_token_kl(shifted, student_labels, teacher, teacher_labels).item() > 0.1


def test_agreeing_only_skips_the_tokens_whose_label_the_teacher_does_not_predict():
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, 5]])
    teacher = torch.full((1, 4, 6), -5.0)
    teacher[0, 0, 1] = teacher[0, 1, 4] = teacher[0, 2, 5] = 5.0  # first answer token: the teacher predicts 1, not 3
    student = teacher.clone()
    student[0, 0] = torch.randn(6)
    assert next_token_kl(student, labels, teacher, labels, agreeing_only=True).item() == pytest.approx(0.0, abs=1e-6)
    assert next_token_kl(student, labels, teacher, labels).item() > 0.1


def test_kl_refuses_rows_that_label_different_answers():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6]])
    with pytest.raises(ValueError, match="must label the same answers"):
        next_token_kl(torch.randn(1, 3, 9), labels, torch.randn(1, 4, 9), torch.tensor([[IGNORE_INDEX, 5, 6, 7]]))


def test_teacher_is_the_llm_without_its_lora_adapters(build):
    processor, model = build("whisper", "llama")
    ids = processor.tokenizer(["hello world"], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = model.language_model(input_ids=ids, attention_mask=mask).logits
    model.add_lora(r=4, target_modules=["q_proj", "v_proj"])
    for name, parameter in model.language_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 1.0)
    model.language_model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.requires_grad = False
    with torch.no_grad():
        adapted = model.language_model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(adapted, before)
    torch.testing.assert_close(teacher_logits(model.language_model, ids, mask), before)
    flags = {name: p.requires_grad for name, p in model.language_model.named_parameters() if "lora_" in name}
    assert flags["model.layers.0.self_attn.q_proj.lora_A.default.weight"] is False
    assert sum(flags.values()) == len(flags) - 1  # every other adapter still trains


def test_trainer_adds_weight_times_kl_to_the_llm_loss(build, tmp_path):
    processor, model = build("whisper", "llama", dtype=torch.float32)
    batch = SpeechLMCollator(processor, distillation=True)(_items(processor))
    trainer = SpeechLMTrainer(model=model, args=_arguments(tmp_path), train_dataset=[0, 1],
                              data_collator=lambda _: batch, distill_weight=0.5)
    model_inputs = {k: v for k, v in batch.items() if not k.startswith(("teacher_", "ctc_"))}
    with torch.no_grad():
        merged = model.prepare_inputs(**model_inputs)
        student = model(**model_inputs)
        teacher = teacher_logits(model.language_model, batch["teacher_input_ids"], batch["teacher_attention_mask"])
        expected = student.loss + 0.5 * next_token_kl(student.logits, merged.labels, teacher, batch["teacher_labels"])
        loss = trainer.compute_loss(model, batch)
    torch.testing.assert_close(loss, expected)


def _kl_after_training(build, tmp_path, distill_weight: float) -> float:
    """The KL to the teacher after 15 steps on one batch (a sharpened tiny LLM, so the teacher has preferences)."""
    processor, model = build("whisper", "llama", dtype=torch.float32)
    model.language_model.lm_head.weight.data *= 20
    model.freeze_encoder()
    model.freeze_decoder()
    batch = SpeechLMCollator(processor, distillation=True)(_items(processor, TEXTS))
    trainer = SpeechLMTrainer(model=model, args=_arguments(tmp_path, steps=15), train_dataset=[0, 1],
                              data_collator=lambda _: batch, distill_weight=distill_weight)
    model.train()
    trainer.train()
    model.eval()
    model_inputs = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    with torch.no_grad():
        merged = model.prepare_inputs(**model_inputs)
        teacher = teacher_logits(model.language_model, batch["teacher_input_ids"], batch["teacher_attention_mask"])
        return next_token_kl(model(**model_inputs).logits, merged.labels, teacher, batch["teacher_labels"]).item()


def test_distillation_moves_the_model_towards_the_teacher(build, tmp_path):
    """The same steps from the same start: with the KL in the loss, the model ends closer to the text-only LLM."""
    assert _kl_after_training(build, tmp_path, 2.0) < 0.5 * _kl_after_training(build, tmp_path, 0.0)


def test_agreeing_only_without_a_weight_is_refused(build, tmp_path):
    _, model = build("whisper", "llama", dtype=torch.float32)
    with pytest.raises(ValueError, match="distill_agreeing_only without distill_weight"):
        SpeechLMTrainer(model=model, args=_arguments(tmp_path), train_dataset=[0], distill_agreeing_only=True)


def test_distill_weight_without_teacher_rows_names_the_collator(build, tmp_path):
    processor, model = build("whisper", "llama", dtype=torch.float32)
    batch = SpeechLMCollator(processor)(_items(processor))
    trainer = SpeechLMTrainer(model=model, args=_arguments(tmp_path), train_dataset=[0, 1],
                              data_collator=lambda _: batch, distill_weight=1.0)
    with pytest.raises(ValueError, match="distillation=True"):
        trainer.compute_loss(model, batch)

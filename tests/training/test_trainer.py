"""Our options on `TrainingArguments` (speechlm/training/trainer.py) and the loss of text-only rows. The Trainer
itself runs in test_runner.py."""

from __future__ import annotations

import pytest
import torch

from speechlm.training import TrainingOptions, make_training_arguments, resolve_precision

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mapping: precision falls back to fp32")


def test_cpu_training_stays_fp32_whatever_is_asked():
    assert [resolve_precision(p) for p in ("auto", "fp32", "bf16", "fp16")] == ["fp32"] * 4


def test_without_eval_data_there_is_no_eval_schedule(tmp_path):
    args = make_training_arguments(TrainingOptions(report_to=[]), tmp_path, has_eval=False, find_unused=False)
    assert args.eval_strategy == "no" and args.eval_steps is None and args.max_steps == 1000


def test_extra_reaches_training_arguments_as_is(tmp_path):
    options = TrainingOptions(report_to=[], extra={"save_only_model": True})
    assert make_training_arguments(options, tmp_path, has_eval=True, find_unused=False).save_only_model


# ------------------------------------------------------------------------------------------- text-only rows
TEXT_EXAMPLES = [{"prompt": "Intent:", "text": '{"intent": "call"}', "transcript": "call mom"},
                 {"prompt": "Intent:", "text": '{"intent": "play"}', "transcript": "play some jazz"}]


def _text_row_batch(build, train_llm: bool = False):
    """A tiny model (encoder frozen, the LLM too unless `train_llm`) and one batch of two clips + two text rows."""
    from speechlm.data import SpeechLMCollator
    from tests.conftest import make_clips

    processor, model = build("whisper", "llama", dtype=torch.float32)
    model.freeze_encoder()
    if not train_llm:
        model.freeze_decoder()
    items = [{"audio": clip, "text": text} for clip, text in zip(make_clips((0.6, 0.9)), ["hello world", "good day"])]
    batch = SpeechLMCollator(processor, text_examples=TEXT_EXAMPLES, text_rows=2)(items)
    return model, batch


def _trainer(model, batch, tmp_path, steps: int = 1, **kwargs):
    from transformers import TrainingArguments

    from speechlm.training import SpeechLMTrainer

    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps,
                                  learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                  remove_unused_columns=False, disable_tqdm=True)
    return SpeechLMTrainer(model=model, args=arguments, train_dataset=[0, 1], data_collator=lambda _: batch, **kwargs)


def _text_loss(model, batch) -> torch.Tensor:
    return model(input_ids=batch["text_input_ids"], decoder_attention_mask=batch["text_attention_mask"],
                 labels=batch["text_labels"]).loss


def test_text_rows_add_their_weighted_loss_to_the_batch_loss(build, tmp_path):
    model, batch = _text_row_batch(build)
    trainer = _trainer(model, batch, tmp_path, text_weight=0.5)
    audio = {key: value for key, value in batch.items() if not key.startswith("text_")}
    with torch.no_grad():
        expected = model(**audio).loss + 0.5 * _text_loss(model, batch)
        torch.testing.assert_close(trainer.compute_loss(model, batch), expected)


def test_text_rows_stay_out_of_the_ctc_pre_alignment(build, tmp_path):
    from speechlm.alignment import CTCAlignmentHead

    model, batch = _text_row_batch(build)
    head = CTCAlignmentHead(model.config.text_config.hidden_size, [0, 1, 2])
    trainer = _trainer(model, batch, tmp_path, ctc_head=head, ctc_only=True)
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, batch), head(model, batch))


def test_text_rows_teach_the_llm_the_answer_from_the_words(build, tmp_path):
    """The same steps from the same start: with the text rows in the loss, the model reads them far better."""
    losses = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model, batch = _text_row_batch(build, train_llm=True)
        model.train()
        _trainer(model, batch, tmp_path, steps=15, text_weight=weight).train()
        model.eval()
        with torch.no_grad():
            losses.append(_text_loss(model, batch).item())
    assert losses[1] < 0.75 * losses[0]


def test_a_negative_text_weight_is_refused(build, tmp_path):
    model, batch = _text_row_batch(build)
    with pytest.raises(ValueError, match="text_weight must be >= 0, got -1"):
        _trainer(model, batch, tmp_path, text_weight=-1)


def test_text_rows_under_a_sharded_engine_are_refused_by_name(build, tmp_path):
    model, batch = _text_row_batch(build)
    trainer = _trainer(model, batch, tmp_path)
    trainer.is_fsdp_enabled = True  # what accelerate sets for an FSDP run
    with pytest.raises(ValueError, match="not under FSDP or DeepSpeed yet"):
        trainer.compute_loss(model, batch)

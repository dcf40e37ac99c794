"""transformers' `Trainer` for SpeechLM: duration-grouped batches, a WER/task-metric pass at every evaluation, the
optional CTC and distillation losses, and our options mapped onto `TrainingArguments` (precision resolved for the
hardware)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from .config import EvaluationConfig, TrainingOptions
from .distributed import is_distributed_launch

logger = logging.getLogger(__name__)


def resolve_precision(requested: str) -> str:
    """bf16/fp16 only where the hardware runs them natively (CUDA); CPU training stays fp32."""
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16" if bf16 else "fp16" if cuda else "fp32"
    if requested == "bf16" and not bf16:
        logger.warning("bf16 requested but this machine has no bf16-capable GPU: training in fp32")
        return "fp32"
    if requested == "fp16" and not cuda:
        logger.warning("fp16 requested but no CUDA GPU is available: training in fp32")
        return "fp32"
    return requested


class SpeechLMTrainer(Trainer):
    """`Trainer` with duration-grouped batches, a WER/CER pass added to every evaluation, and optionally a CTC head's
    loss (`ctc_head`, `ctc_weight`, `ctc_only`), distillation against the text-only LLM (`distill_weight`) and the
    loss of a batch's text-only rows (`SpeechLMCollator(text_rows=...)`, weighted by `text_weight`)."""

    def __init__(self, *args, wer_records=None, evaluation: EvaluationConfig | None = None, task_prompts=None,
                 ctc_head=None, ctc_weight: float = 0.0, ctc_only: bool = False, distill_weight: float = 0.0,
                 distill_agreeing_only: bool = False, text_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if text_weight < 0:
            raise ValueError(f"text_weight must be >= 0, got {text_weight}")
        self.text_weight = text_weight
        self.wer_records = list(wer_records or [])
        self.evaluation_config = evaluation or EvaluationConfig()
        self._in_task_loop = False
        if self.wer_records and self.evaluation_config.wer:  # a wrong task metric fails now, not at the first eval
            from ..tasks import resolve_kinds

            resolve_kinds(self.wer_records, self.evaluation_config.task_metrics)
        self.task_prompts = task_prompts
        # CTC alignment (speechlm.alignment): `ctc_only` skips the LLM pass (pre-alignment), else weight x CTC is added.
        if ctc_head is not None and self.args.world_size > 1:
            raise ValueError("CTC alignment (ctc_head) runs in a single process; drop it for distributed training")
        self.ctc_head = ctc_head.to(self.args.device) if ctc_head is not None else None
        self.ctc_weight, self.ctc_only = ctc_weight, ctc_only
        # Distillation (speechlm.training.distillation): weight x KL to the text-only LLM, added to the LLM loss.
        if distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {distill_weight}")
        if distill_agreeing_only and not distill_weight:
            raise ValueError("distill_agreeing_only without distill_weight > 0 changes nothing: set distill_weight")
        if distill_weight and self.args.world_size > 1:
            raise ValueError("distillation (distill_weight) runs in a single process; drop it for distributed training")
        self.distill_weight, self.distill_agreeing_only = distill_weight, distill_agreeing_only

    # Checkpoints are written here, then renamed to `checkpoint-N` (not a `checkpoint-*` name: rotation ignores it).
    staging_name = ".saving"

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, self.staging_name) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint to a staging folder and rename it into place once every file is written.

        transformers writes `checkpoint-N` file by file, so a kill mid-save leaves a half checkpoint under the name
        `--resume` looks for; a rename is atomic, so `checkpoint-N` is either complete or absent. (Without fsync: a
        killed process loses nothing the kernel holds; a power cut can.) Rotation runs after the rename.
        """
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self._get_output_dir(trial)
        staging = os.path.join(run_dir, self.staging_name)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed save left
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are in the staging folder
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):  # an older, incomplete save of the same step (saves used not to be atomic)
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(
                    self.state.best_model_checkpoint))  # fmt: skip
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)  # fmt: skip
        self.accelerator.wait_for_everyone()

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.ctc_head is not None and not any(
            p is self.ctc_head.blank for group in optimizer.param_groups for p in group["params"]
        ):
            optimizer.add_param_group({"params": list(self.ctc_head.parameters()), "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # `ctc_labels`: the transcript the CTC head aligns the audio with, when the LLM learns another answer
        # (an understanding task on the same clip); never an input of the model itself.
        # `teacher_*`: the text-only rows of distillation, read by the LLM alone.
        # `text_*`: text-only rows (`TEXT_ROW_KEYS`), the transcript where a clip would stand, read by the same model.
        from ..data.dataset import TEXT_ROW_KEYS
        from .distillation import TEACHER_KEYS

        model_inputs = {key: value for key, value in inputs.items()
                        if key not in ("ctc_labels", *TEACHER_KEYS, *TEXT_ROW_KEYS)}
        uses_ctc = self.ctc_head is not None and (self.ctc_only or self.ctc_weight)
        if TEXT_ROW_KEYS[0] in inputs and self.text_weight and not self.ctc_only:
            loss, outputs = self._loss_with_text_rows(model, inputs, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        if not uses_ctc and not self.distill_weight:
            return super().compute_loss(model, model_inputs, return_outputs, num_items_in_batch)
        if uses_ctc:
            ctc = self.ctc_head(self.accelerator.unwrap_model(model), inputs)
            if self.ctc_only:
                return (ctc, None) if return_outputs else ctc
        if self.distill_weight:
            loss, outputs = self._distilled_loss(model, model_inputs, inputs, num_items_in_batch)
        else:
            loss, outputs = super().compute_loss(model, model_inputs, True, num_items_in_batch)
        if uses_ctc:
            loss = loss + self.ctc_weight * ctc
        return (loss, outputs) if return_outputs else loss

    def _loss_with_text_rows(self, model, inputs: dict, num_items_in_batch):
        """The batch's own loss (CTC and distillation as configured) plus `text_weight` x the mean token loss of its
        text-only rows, read by the same model (its adapters on) with no audio.

        The rows go through the unwrapped model: DDP marks each parameter ready once per backward, and a second
        pass through its wrapper would mark the LLM's twice (one backward through both passes sums their gradients
        first). Sharded engines hold no whole parameters outside their wrapper, so they are refused by name."""
        from ..data.dataset import TEXT_ROW_KEYS

        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError("text-only rows (text_rows) train in one process or under DDP (torchrun), not under "
                             "FSDP or DeepSpeed yet: drop them for a sharded run")
        audio_inputs = {key: value for key, value in inputs.items() if key not in TEXT_ROW_KEYS}
        loss, outputs = self.compute_loss(model, audio_inputs, True, num_items_in_batch)
        ids, mask, labels = (inputs[key] for key in TEXT_ROW_KEYS)
        unwrapped = self.accelerator.unwrap_model(model)
        text = unwrapped(input_ids=ids, decoder_attention_mask=mask, labels=labels).loss
        return loss + self.text_weight * text, outputs

    def _distilled_loss(self, model, model_inputs: dict, inputs: dict, num_items_in_batch):
        """The LLM loss on the merged audio + text, plus `distill_weight` x KL to the text-only LLM's predictions."""
        from .distillation import TEACHER_KEYS, next_token_kl, teacher_logits

        if any(key not in inputs for key in TEACHER_KEYS):
            raise ValueError("distill_weight > 0 needs the teacher's text-only rows in every batch: build the "
                             "collator with SpeechLMCollator(..., distillation=True)")
        unwrapped = self.accelerator.unwrap_model(model)
        merged = unwrapped.prepare_inputs(**model_inputs)
        student_inputs = {"inputs_embeds": merged.inputs_embeds, "attention_mask": merged.attention_mask,
                          "position_ids": merged.position_ids, "labels": merged.labels}
        loss, outputs = super().compute_loss(model, student_inputs, True, num_items_in_batch)
        teacher = teacher_logits(unwrapped.language_model, inputs["teacher_input_ids"],
                                 inputs["teacher_attention_mask"])
        kl = next_token_kl(outputs.logits, merged.labels, teacher, inputs["teacher_labels"],
                           agreeing_only=self.distill_agreeing_only)
        return loss + self.distill_weight * kl, outputs

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            from ..data import DurationGroupedSampler

            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return DurationGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                          dataset.lengths, seed=seed)
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        # The stock group_by_length eval sampler would decode every clip to measure it; order does not matter here.
        if self.args.world_size <= 1:
            return torch.utils.data.SequentialSampler(eval_dataset)
        return None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self._in_task_loop:  # one task of a per-task eval set: Trainer's dict loop calls back here
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        target = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(target, dict):
            from ..tasks import pooled_loss

            self._in_task_loop = True
            try:
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            finally:
                self._in_task_loop = False
            loss = pooled_loss(metrics, {name: len(part) for name, part in target.items()}, metric_key_prefix)
            if loss is not None:
                self.log(loss)
                metrics.update(loss)
        else:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix) if self.eval_dataset else {}
        if self.wer_records and self.evaluation_config.wer:
            wer = self.word_error_rates(metric_key_prefix)
            if wer:
                self.log(wer)
                metrics.update(wer)
        return metrics

    def word_error_rates(self, prefix: str = "eval") -> dict[str, float]:
        """Metrics of the decoded `wer_records`, each process decoding its share (gathered afterwards): WER/CER, or
        with several tasks each task's own (`speechlm.tasks.headline_metrics`) and the WER of the transcription ones.
        """
        from accelerate.utils import gather_object

        from ..evaluation import transcribe_records
        from ..tasks import headline_metrics, resolve_kinds, score_records, transcription_scores

        if self.is_fsdp_enabled:
            logger.warning("WER during training is skipped under FSDP; run `speechlm evaluate` on the result")
            return {}
        model = self.accelerator.unwrap_model(self.model)
        rank, world = self.args.process_index, self.args.world_size
        shard = list(range(rank, len(self.wer_records), world))
        was_training = model.training
        model.eval()
        cfg = self.evaluation_config
        try:
            hypotheses = transcribe_records(
                model, self.processing_class, [self.wer_records[i] for i in shard], batch_size=cfg.batch_size,
                prompt=cfg.prompt, task_prompts=self.task_prompts, max_new_tokens=cfg.max_new_tokens,
                num_beams=cfg.num_beams,
            )  # fmt: skip
        finally:
            model.train(was_training)
        pairs = list(zip(shard, hypotheses))
        if world > 1:
            pairs = gather_object(pairs)
        by_index = dict(pairs)
        ordered = [by_index[i] for i in range(len(self.wer_records))]
        kinds = resolve_kinds(self.wer_records, cfg.task_metrics)
        scores = score_records(self.wer_records, ordered, kinds)
        return headline_metrics(scores, transcription_scores(self.wer_records, ordered, kinds), prefix)


def make_training_arguments(options: TrainingOptions, output_dir: Path, has_eval: bool, find_unused: bool):
    """`transformers.TrainingArguments` from our options (precision resolved, CPU-friendly distributed defaults)."""
    precision = resolve_precision(options.precision)
    cuda = torch.cuda.is_available()
    eval_steps = options.eval_steps if has_eval else None
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=options.max_steps if options.max_steps and options.max_steps > 0 else -1,
        num_train_epochs=options.num_train_epochs,
        per_device_train_batch_size=options.per_device_train_batch_size,
        per_device_eval_batch_size=options.per_device_eval_batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=options.learning_rate,
        lr_scheduler_type=options.lr_scheduler_type,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=options.logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        seed=options.seed,
        train_sampling_strategy="group_by_length" if options.group_by_length else "random",
        report_to=list(options.report_to or []),
        dataloader_num_workers=options.dataloader_num_workers,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=find_unused,
    )
    if not cuda and is_distributed_launch():
        kwargs.update(use_cpu=True, ddp_backend="gloo")  # CPU-only DDP (torchrun): accelerate's MULTI_CPU over gloo
    if options.gradient_checkpointing:
        # Recent transformers renamed gradient_checkpointing to activation_checkpointing; use whichever exists.
        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        kwargs[name] = True
        kwargs[f"{name}_kwargs"] = {"use_reentrant": False}
    kwargs.update(options.extra or {})
    return TrainingArguments(**kwargs)


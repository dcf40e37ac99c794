"""Distillation against the text-only LLM, Ultravox's recipe: the frozen LLM reads the transcript where the audio
stands and predicts the same answer; the model, reading the audio, is pulled towards that next-token distribution
(KL, beside its own loss). The audio should read to the LLM like its words, and the answers keep the LLM's own
behaviour rather than a prior learnt from the training answers alone.

The collator (`SpeechLMCollator(distillation=True)`) adds the teacher's rows (`TEACHER_KEYS`): the same prompt and
answer, with the example's transcript in place of the clip (`SpeechLMProcessor.build_prompt(audio_text=...)`). Both
rows tokenize the answer alone, so their labelled tokens pair up one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adaptation import lora_disabled
from ..configuration import IGNORE_INDEX

TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels")


@torch.no_grad()
def teacher_logits(language_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The LLM's logits over the text-only rows, its LoRA adapters (if any) switched off: the frozen text LLM."""
    with lora_disabled(language_model):
        return language_model(input_ids=input_ids, attention_mask=attention_mask).logits


def labelled_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict each label, row by row (N x vocabulary), and those labels (N). `logits` may cover
    only the last positions of `labels` (the model skips the LM head before the first label while training)."""
    labels = labels[:, labels.shape[1] - logits.shape[1]:][:, 1:]
    kept = labels != IGNORE_INDEX
    return logits[:, :-1][kept], labels[kept]


def next_token_kl(student_logits: torch.Tensor, student_labels: torch.Tensor, teacher: torch.Tensor,
                  teacher_labels: torch.Tensor, agreeing_only: bool = False) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over the answer's tokens; `agreeing_only`: over
    the tokens whose label is the teacher's top token (a teacher that disagrees with the label would teach another
    answer: the demo's teacher never predicts an answer's first token nor its EOS, `distillation_teacher.py`)."""
    student, labels = labelled_logits(student_logits, student_labels)
    target, _ = labelled_logits(teacher, teacher_labels)
    if student.shape[0] != target.shape[0]:
        raise ValueError(f"the teacher's rows label {target.shape[0]} tokens but the model's {student.shape[0]}: "
                         "both must label the same answers")
    if agreeing_only:
        agrees = target.argmax(-1) == labels
        student, target = student[agrees], target[agrees]
    if not len(student):
        return student_logits.sum() * 0.0
    return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(target.float(), -1), log_target=True,
                    reduction="batchmean")


__all__ = ["TEACHER_KEYS", "labelled_logits", "next_token_kl", "teacher_logits"]

"""Our options on `TrainingArguments` (speechlm/training/trainer.py). The Trainer itself runs in test_runner.py."""

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

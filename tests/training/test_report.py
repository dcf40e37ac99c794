"""What a run writes beside the model (speechlm/training/report.py): curves on one step axis, strict JSON."""

from __future__ import annotations

import json
import math

from speechlm.training import TrainConfig
from speechlm.training.report import _curves, write_report


def _summary(stage: str, steps: int, losses: list[float]) -> dict:
    """A stage summary as the runner writes it, with one training loss logged per step."""
    return {"stage": stage, "index": 0, "global_step": steps, "train_loss": losses[-1], "elapsed_seconds": 6.0,
            "trainable_parameters": 10, "total_parameters": 100, "learning_rate": 1e-3, "world_size": 1,
            "ranks_agree": True, "log_history": [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]}  # fmt: skip


def test_each_stage_continues_the_step_axis_of_the_one_before():
    curves = _curves([_summary("projector", 2, [3.0, 2.0]), _summary("lora", 2, [1.5, 1.0])])
    assert curves["loss"] == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]


def test_a_non_finite_loss_is_null_in_the_summary(tmp_path):
    config = TrainConfig.from_dict({"model": {"encoder": "e", "decoder": "d"}, "data": {"train_manifest": "x"}})
    write_report(config, tmp_path, [_summary("lora", 2, [1.0, math.nan])], elapsed=12.0)
    summary = json.loads((tmp_path / "training_summary.json").read_text())  # strict JSON: no NaN
    assert summary["stages"][0]["train_loss"] is None and summary["global_step"] == 2
    assert "| lora | 2 |" in (tmp_path / "training_report.md").read_text()

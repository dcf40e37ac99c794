"""What a stage lets train (speechlm/training/stages.py): LoRA from the stage's keys, freezing, nothing-to-train; the
model a config builds."""

from __future__ import annotations

import pytest
import torch
import yaml

from speechlm.modeling import LORA_DEFAULTS
from speechlm.training import StageConfig, apply_stage, count_parameters, load_config
from speechlm.training.stages import build_model_and_processor


def test_lora_keys_left_out_keep_the_model_defaults(build):
    _, model = build("whisper", "qwen2", dtype=torch.float32)
    apply_stage(model, StageConfig(name="lora", lora={"r": 4, "lora_alpha": 8}))
    assert model.config.lora == {"r": 4, "lora_alpha": 8, "lora_dropout": LORA_DEFAULTS["lora_dropout"],
                                 "target_modules": "all-linear"}  # fmt: skip


def test_a_projector_stage_trains_only_the_projector(build):
    _, model = build("whisper", "qwen2", dtype=torch.float32)
    apply_stage(model, StageConfig(name="projector"))
    trainable = {name.split(".")[0] for name, param in model.named_parameters() if param.requires_grad}
    assert "audio_tower" not in trainable and "language_model" not in trainable
    assert "multi_modal_projector" in trainable and count_parameters(model)[0] < count_parameters(model)[1]


def test_a_stage_that_trains_nothing_is_an_error(build):
    _, model = build("whisper", "qwen2", dtype=torch.float32)
    with pytest.raises(ValueError, match="stage 'idle' trains nothing"):
        apply_stage(model, StageConfig(name="idle", train_projector=False, train_lora=False))


def test_the_config_s_projector_layers_reach_the_model(base_config, tmp_path):
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(base_config(tmp_path / "out")))
    config = load_config(tmp_path / "train.yaml", {"model.projector_layers": 2})
    _, model = build_model_and_processor(config)
    assert len(model.multi_modal_projector.layers) == model.config.projector_layers == 2

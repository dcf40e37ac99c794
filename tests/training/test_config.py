"""The training config (speechlm/training/config.py): dotted overrides, validation with suggestions, one name per
setting (the old spellings still read, with a warning)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from speechlm.training import TrainConfig, load_config

OVERRIDES = {"training.max_steps": 20, "stages.1.learning_rate": 1e-3, "stages.1.lora.r": 8}
EXAMPLE = Path(__file__).resolve().parents[2] / "speechlm" / "configs" / "train_example.yaml"


def _old_spelling(tmp_path) -> Path:
    """A config written with the pre-unification keys."""
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"encoder": "enc", "decoder": "dec", "projection_hidden_size": 64, "encoder_dropout": 0.2},
        "data": {"train_manifest": "train.jsonl"},
        "stages": [{"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}],
    }))  # fmt: skip
    return path


def test_overrides_reach_sections_stages_and_lora(config_path):
    config = load_config(config_path, OVERRIDES)
    assert config.training.max_steps == 20 and config.stages[0].training == {"max_steps": 10}
    assert config.stages[1].training == {"learning_rate": 1e-3} and config.stages[1].lora == {"r": 8}


def test_the_saved_config_reloads_to_the_same_config(config_path):
    config = load_config(config_path, OVERRIDES)
    assert TrainConfig.from_dict(config.to_dict()) == config  # the saved config.yaml reloads to the same config


def test_unknown_keys_are_errors_with_a_suggestion(config_path):
    with pytest.raises(ValueError, match=r"unknown key 'max_step' in training \(did you mean 'max_steps'\?\)"):
        load_config(config_path, {"training.max_step": 1})
    with pytest.raises(ValueError, match=r"unknown key 'lr' in stages\[0\]"):
        load_config(config_path, {"stages.0.lr": 1})


def test_a_config_needs_a_model():
    with pytest.raises(ValueError, match="needs model.encoder and model.decoder"):
        TrainConfig.from_dict({"data": {"train_manifest": "x"}})


def test_text_rows_need_a_file_of_text_examples():
    with pytest.raises(ValueError, match="training.text_rows needs data.text_examples"):
        TrainConfig.from_dict({"model": {"encoder": "e", "decoder": "d"}, "data": {"train_manifest": "x"},
                               "training": {"text_rows": 4}})


def test_task_metric_kinds_are_validated():
    with pytest.raises(ValueError, match="unknown task metric kind 'bleu'"):
        TrainConfig.from_dict({"model": {"encoder": "e", "decoder": "d"}, "data": {"train_manifest": "x"},
                               "evaluation": {"task_metrics": {"slu": "bleu"}}})


def test_old_model_keys_are_read_under_the_config_names_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="model.projection_hidden_size is deprecated.*model.projector_hidden_size"):
        config = load_config(_old_spelling(tmp_path))
    assert config.model.projector_hidden_size == 64 and config.model.projector_dropout == 0.2


def test_old_lora_keys_are_read_under_peft_names_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match=r"stages.0.lora.alpha is deprecated.*stages.0.lora.lora_alpha"):
        config = load_config(_old_spelling(tmp_path))
    assert config.stages[0].lora == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}


def test_an_override_in_either_spelling_replaces_an_old_yaml_key(tmp_path):
    with pytest.warns(FutureWarning):
        config = load_config(_old_spelling(tmp_path), {"model.projector_hidden_size": 16, "stages.0.lora.alpha": 2})
    assert config.model.projector_hidden_size == 16 and config.stages[0].lora["lora_alpha"] == 2


def test_both_spellings_of_one_key_are_an_error():
    values = {"model": {"encoder": "e", "decoder": "d", "encoder_dropout": 0.1, "projector_dropout": 0.2},
              "data": {"train_manifest": "x"}}  # fmt: skip
    with pytest.raises(ValueError, match="sets both 'encoder_dropout' and 'projector_dropout'"):
        TrainConfig.from_dict(values)


def test_the_example_config_uses_only_current_keys():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config(EXAMPLE)
    assert config.stages[1].lora["lora_alpha"] == 32 and config.model.projector_dropout == 0.1

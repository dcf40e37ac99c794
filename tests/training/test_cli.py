"""`speechlm train` options and `speechlm merge-lora` (speechlm/training/cli.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from speechlm import cli
from tests.training.conftest import ROOT


def test_print_config_applies_section_options_and_set(config_path, capsys):
    argv = ["train", "--config", str(config_path), "--training.max_steps", "7", "--training.report_to", "[]",
            "--data.encoder_cache", "null", "--set", "stages.0.learning_rate=0.01", "--print-config"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["max_steps"] == 7 and printed["training"]["report_to"] == []
    assert printed["stages"][0]["training"] == {"max_steps": 10, "learning_rate": 0.01}


def test_an_unknown_key_is_a_message_not_a_traceback(config_path):
    with pytest.raises(SystemExit, match="unknown key 'bogus'"):
        cli.main(["train", "--config", str(config_path), "--set", "model.bogus=1"])


def test_the_old_model_option_spelling_still_parses(config_path, capsys):
    with pytest.warns(FutureWarning, match="projection_hidden_size is deprecated"):
        argv = ["train", "--config", str(config_path), "--model.projection_hidden_size", "48", "--print-config"]
        assert cli.main(argv) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["projector_hidden_size"] == 48


def test_train_options_load_without_torch():
    # `speechlm train --help` builds these options: the config and CLI modules must not pull in torch or transformers.
    code = ("import sys, types; package = types.ModuleType('speechlm'); package.__path__ = ['speechlm'];"
            "sys.modules['speechlm'] = package; import argparse, speechlm.training.cli as c;"
            "c.add_train_arguments(argparse.ArgumentParser());"
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_merge_lora_gives_identical_logits(build, clips, tmp_path):
    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    model.add_lora(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)  # a trained-looking adapter (fresh ones are zero and change nothing)
    model.save_pretrained(tmp_path / "lora")
    processor.save_pretrained(tmp_path / "lora")
    assert cli.main(["merge-lora", str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0

    from speechlm.inference import load_pretrained

    processor, before = load_pretrained(str(tmp_path / "lora"))
    _, after = load_pretrained(str(tmp_path / "merged"))
    assert after.config.lora is None and not any("lora_" in name for name, _ in after.named_parameters())
    batch = processor(clips, text=["call mom", "play", "set an alarm"])
    with torch.no_grad():
        logits = before(**batch).logits
        torch.testing.assert_close(after(**batch).logits, logits, atol=1e-5, rtol=1e-5)
        for name, param in before.named_parameters():
            if "lora_B" in name:
                param.zero_()
        assert (before(**batch).logits - logits).abs().max() > 1e-2  # the adapters did matter
        for name, param in model.named_parameters():  # restore them for the generation check below
            if "lora_B" in name:
                before.get_parameter(name).copy_(param)
    inputs = processor(clips)
    assert after.generate(**inputs, max_new_tokens=5).tolist() == before.generate(**inputs, max_new_tokens=5).tolist()
    with pytest.raises(ValueError, match="no LoRA adapters"):
        cli.main(["merge-lora", str(tmp_path / "merged"), str(tmp_path / "again")])

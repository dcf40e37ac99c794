"""Which checkpoint `--resume` starts from (speechlm/training/checkpoints.py): after a save killed midway the newest
*complete* checkpoint wins, and broken files are named, not raised."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from speechlm import cli
from speechlm.training import checkpoint_problem, train


@pytest.fixture(scope="module")
def reference(base_config, tmp_path_factory):
    """One uninterrupted 8-step run with checkpoints at steps 4 and 8."""
    return train(base_config(tmp_path_factory.mktemp("resume") / "reference"))


def _unfinished_copy(reference, tmp_path, base_config):
    """The reference run as a kill during the save of checkpoint-8 leaves it: no final model, stage not done."""
    output = tmp_path / "killed"
    shutil.copytree(reference / "stages", output / "stages")
    stage = output / "stages" / "01-lora"
    (stage / "stage_done.json").unlink()
    shutil.rmtree(stage / "final", ignore_errors=True)
    config = base_config(output)
    return output, stage, config


def test_checkpoint_problem_names_what_is_broken(reference, tmp_path):
    good = reference / "stages" / "01-lora" / "checkpoint-4"
    assert checkpoint_problem(good) is None
    cases = {
        "trainer_state.json": ("delete", "no trainer_state.json"),
        "model.safetensors": ("truncate", "model.safetensors is truncated"),
        "optimizer.pt": ("truncate", "optimizer.pt is truncated or corrupt"),
        "scheduler.pt": ("truncate", "scheduler.pt is truncated or corrupt"),
    }
    for name, (action, expected) in cases.items():
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(good, broken)
        if action == "delete":
            (broken / name).unlink()
        else:
            data = (broken / name).read_bytes()
            (broken / name).write_bytes(data[: len(data) // 2])
        assert expected in (checkpoint_problem(broken) or ""), name


def test_resume_skips_a_checkpoint_broken_mid_save(reference, base_config, tmp_path, caplog):
    output, stage, config = _unfinished_copy(reference, tmp_path, base_config)
    weights = stage / "checkpoint-8" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # killed while writing the weights
    (stage / "checkpoint-8" / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="speechlm.training"):
        assert train(config, resume=True) == output
    assert any("skipping incomplete checkpoint" in r.getMessage() and "checkpoint-8" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    # Steps 5-8 were trained again from checkpoint-4: the weights equal the uninterrupted run's.
    expected, got = load_file(reference / "model.safetensors"), load_file(output / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4, msg=name)


def test_resume_from_a_truncated_checkpoint_path_is_a_clear_error(reference, base_config, tmp_path, capsys):
    output, stage, config = _unfinished_copy(reference, tmp_path, base_config)
    optimizer = stage / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"cannot resume from .*checkpoint-4: optimizer.pt is truncated or corrupt"):
        cli.main(["train", "--config", str(config_path), "--resume", str(stage / "checkpoint-4")])

"""Which checkpoint `--resume` starts from (speechlm/training/checkpoints.py): after a save killed midway the newest
*complete* checkpoint wins, and broken files are named, not raised."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from speechlm import cli
from speechlm.training import checkpoint_problem, train
from speechlm.training.trainer import SpeechLMTrainer
from tests.training.conftest import ROOT


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


# Runs `train` on a YAML config; when the run reaches the named point it writes the marker file and stalls there, so
# the test can SIGKILL it at exactly that moment: "save N" = inside the save of checkpoint-N (model weights written,
# optimizer/scheduler/RNG/trainer state not yet), "step N" = in the training step after global step N.
_STALLING_RUN = """
import sys, time, yaml
from pathlib import Path
from speechlm.training import train
from speechlm.training.trainer import SpeechLMTrainer

config, marker, where, step = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def stall():
    marker.write_text(where)
    time.sleep(600)

if where == "save":
    save = SpeechLMTrainer._save_optimizer_and_scheduler
    def stalled_save(self, output_dir):
        if self.state.global_step == step:
            stall()
        return save(self, output_dir)
    SpeechLMTrainer._save_optimizer_and_scheduler = stalled_save
else:
    training_step = SpeechLMTrainer.training_step
    def stalled_step(self, *args, **kwargs):
        if self.state.global_step == step:
            stall()
        return training_step(self, *args, **kwargs)
    SpeechLMTrainer.training_step = stalled_step
train(yaml.safe_load(Path(config).read_text()))
"""


@pytest.mark.parametrize("where, step, resumes_from", [("save", 4, None), ("step", 6, 4), ("save", 8, 4)],
                         ids=["inside-first-save", "between-saves", "inside-second-save"])  # fmt: skip
def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(reference, base_config, tmp_path, where, step,
                                                                  resumes_from):  # fmt: skip
    """SIGKILL a real training process inside a save or between saves; only complete checkpoints are left, and
    `--resume` ends with the uninterrupted run's weights.

    Compared with `assert_close` (atol 1e-4, as the in-process resume test above), not bitwise: the reference run
    trains in this process and the killed one in a child with one OMP thread, and thread counts change float
    reduction order.
    """
    output = tmp_path / "run"
    config = base_config(output)
    config_path, marker = tmp_path / "config.yaml", tmp_path / "stalled"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _STALLING_RUN, str(config_path), str(marker), where, str(step)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the training run never reached the kill point"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    stage = output / "stages" / "01-lora"
    left = sorted(p.name for p in stage.glob("checkpoint-*"))
    assert left == ([f"checkpoint-{resumes_from}"] if resumes_from else []), left
    assert all(checkpoint_problem(stage / name) is None for name in left)
    assert train(config, resume=True) == output
    expected, got = load_file(reference / "model.safetensors"), load_file(output / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4, msg=name)
    assert not (stage / SpeechLMTrainer.staging_name).exists()

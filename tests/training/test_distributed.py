"""DDP through `speechlm train` under torchrun (speechlm/training/distributed.py): two CPU processes end with the
same weights, and the sharded WER pass gathers both halves. FSDP2 and a two-node rendezvous: tests/test_distributed.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.training.conftest import _env, _summary


def test_ddp_two_cpu_processes_agree(base_config, tmp_path):
    config = base_config(tmp_path / "ddp", training={"max_steps": 3, "save_steps": 3, "eval_steps": 3,
                                                     "report_to": []})  # fmt: skip
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "speechlm.cli", "train", "--config", str(config_path)]  # fmt: skip
    result = subprocess.run(command, env=_env(), capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    stage_dir = tmp_path / "ddp" / "stages" / "01-lora"
    hashes = [(stage_dir / f"weights_sha256.rank{rank}.txt").read_text().strip() for rank in (0, 1)]
    assert hashes[0] == hashes[1]
    stage = _summary(tmp_path / "ddp")["stages"][0]
    assert stage["world_size"] == 2 and stage["ranks_agree"] and stage["trainable_weights_sha256"] == hashes[0]
    log = json.loads((stage_dir / "stage_done.json").read_text())["log_history"]
    assert any("eval_wer" in entry for entry in log)  # the sharded WER pass gathered both halves

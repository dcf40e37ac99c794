"""DDP through `speechlm train` under torchrun (speechlm/training/distributed.py): two CPU processes end with the
same weights, and the sharded WER pass gathers both halves; the DeepSpeed accelerate configs run `speechlm train` on
2 CPU processes (slow: DeepSpeed compiles its CPU shared-memory op first). FSDP2, DeepSpeed through the Trainer against
one process, gradient checkpointing and a two-node rendezvous: tests/test_distributed.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.training.conftest import ROOT, _env, _summary


def _train_on_two_processes(config: dict, tmp_path) -> dict:
    """`speechlm train` under torchrun on 2 CPU processes; the run's first stage summary."""
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "speechlm.cli", "train", "--config", str(config_path)]  # fmt: skip
    result = subprocess.run(command, env=_env(), capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    return _summary(tmp_path / "ddp")["stages"][0]


def test_ddp_two_cpu_processes_agree(base_config, tmp_path):
    config = base_config(tmp_path / "ddp", training={"max_steps": 3, "save_steps": 3, "eval_steps": 3,
                                                     "report_to": []})  # fmt: skip
    stage = _train_on_two_processes(config, tmp_path)
    stage_dir = tmp_path / "ddp" / "stages" / "01-lora"
    hashes = [(stage_dir / f"weights_sha256.rank{rank}.txt").read_text().strip() for rank in (0, 1)]
    assert hashes[0] == hashes[1]
    assert stage["world_size"] == 2 and stage["ranks_agree"] and stage["trainable_weights_sha256"] == hashes[0]
    log = json.loads((stage_dir / "stage_done.json").read_text())["log_history"]
    assert any("eval_wer" in entry for entry in log)  # the sharded WER pass gathered both halves


def test_ddp_with_text_rows_two_cpu_processes_agree(base_config, tmp_path):
    """Text-only rows go through the unwrapped model beside the DDP forward: both ranks (each drawing its own rows)
    end with the same weights."""
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"transcript": f"call {name}", "text": name, "prompt": "who?"}) + "\n"
                            for name in ("mom", "dad", "alice", "bob")))
    config = base_config(tmp_path / "ddp", data={"eval_manifest": None, "text_examples": str(text)},
                         training={"max_steps": 3, "save_steps": 3, "report_to": [], "text_rows": 2})
    stage = _train_on_two_processes(config, tmp_path)
    assert stage["world_size"] == 2 and stage["ranks_agree"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_accelerate_config_trains(stage, base_config, tmp_path_factory, tmp_path):
    """`accelerate launch --config_file configs/accelerate/deepspeed_<stage>.yaml -m speechlm.cli train` on 2 CPU
    processes: DeepSpeed's CPU accelerator over gloo, fp32 (`--mixed_precision no`: the files say bf16 for GPUs).
    DeepSpeed JIT-compiles its shared-memory all-reduce op (about a minute with g++) into TORCH_EXTENSIONS_DIR."""
    pytest.importorskip("deepspeed")
    config = base_config(tmp_path / "ds", training={"max_steps": 3, "save_steps": 3, "eval_steps": 3,
                                                    "report_to": []})  # fmt: skip
    config_path = tmp_path / "ds.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / f"deepspeed_{stage}.yaml"), "--mixed_precision", "no",
               "-m", "speechlm.cli", "train", "--config", str(config_path)]  # fmt: skip
    # A private extension folder: a build killed in the shared ~/.cache/torch_extensions leaves a lock that makes
    # every later DeepSpeed start wait forever.
    extensions = tmp_path_factory.getbasetemp() / "torch_extensions"
    env = {**_env(), "TORCH_EXTENSIONS_DIR": str(extensions)}
    result = subprocess.run(command, env=env, capture_output=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    stage_summary = _summary(tmp_path / "ds")["stages"][0]
    assert stage_summary["world_size"] == 2 and stage_summary["ranks_agree"] and stage_summary["global_step"] == 3
    checkpoint = tmp_path / "ds" / "stages" / "01-lora" / "checkpoint-3"
    assert (checkpoint / "global_step3").is_dir()  # DeepSpeed's own (partitioned) optimizer states
    log = json.loads((tmp_path / "ds" / "stages" / "01-lora" / "stage_done.json").read_text())["log_history"]
    assert any("eval_wer" in entry for entry in log)  # generate under ZeRO-3 (synced over the ranks) too
    from speechlm import SpeechLMModel

    model = SpeechLMModel.from_pretrained(tmp_path / "ds")  # a full checkpoint, gathered under ZeRO-3
    assert all(param.numel() > 0 for param in model.parameters())


def test_a_rank_that_exits_early_still_runs_exit_handlers_flushes_and_returns_its_code():
    """`exit_rank` skips the interpreter's teardown (where torch's C++ side aborted finished ranks), not the work a
    normal exit does: buffered output and exit handlers (e.g. a tracker's upload) are not lost."""
    code = """
import atexit, sys
from speechlm.training.distributed import exit_rank
atexit.register(lambda: print("handler ran"))
sys.stdout.write("buffered ")
exit_rank(3)
"""
    result = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (3, "buffered handler ran\n")

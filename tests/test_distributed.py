"""Beyond one process on CPU: FSDP2 (torch's fully_shard over gloo) and DeepSpeed ZeRO-2 / ZeRO-3 (through
transformers' Trainer) against one process on the same global batch, gradient checkpointing with a frozen encoder
under DDP, FSDP2 and DeepSpeed, and a 2-"node" torchrun rendezvous (c10d on 127.0.0.1) running `speechlm train`.

Each test launches 2 processes with one thread each; only 127.0.0.1 is used. The workers: tests/distributed_worker.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.training.conftest import _env, _summary, base_config, corpus  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=_env(), capture_output=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    return result


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", *args]


@pytest.fixture(scope="module")
def tiny_dirs(model_dirs):
    return str(model_dirs("encoder", "whisper")), str(model_dirs("decoder", "qwen2"))


@pytest.fixture(scope="module")
def loop_reference(tiny_dirs, tmp_path_factory) -> Path:
    """One process, a plain AdamW loop on the whole global batch: what FSDP2 must reproduce."""
    out = tmp_path_factory.mktemp("loop") / "single"
    _run([sys.executable, str(WORKER), *tiny_dirs, str(out), "--lora"])
    return out


@pytest.fixture(scope="module")
def trainer_reference(tiny_dirs, tmp_path_factory) -> Path:
    """One process, transformers' Trainer on the whole global batch: what DDP and DeepSpeed must reproduce."""
    out = tmp_path_factory.mktemp("trainer") / "single"
    _run([sys.executable, str(WORKER), *tiny_dirs, str(out), "--trainer", "single", "--lora"])
    return out


def _distributed(tiny_dirs, out: Path, *options: str) -> dict:
    _run(_torchrun("--standalone", "--nproc_per_node", "2", str(WORKER), *tiny_dirs, str(out), "--lora", *options))
    return json.loads((out / "summary.json").read_text())


def _same_training(ours: Path, reference: Path) -> None:
    """The same loss curve (and it falls) and the same trained weights as the reference run."""
    mine, theirs = (json.loads((path / "summary.json").read_text()) for path in (ours, reference))
    torch.testing.assert_close(torch.tensor(mine["losses"]), torch.tensor(theirs["losses"]), rtol=1e-3, atol=0)
    assert len(mine["losses"]) == 4 and mine["losses"][-1] < mine["losses"][0]
    trained, expected = (torch.load(path / "trained.pt") for path in (ours, reference))
    assert trained.keys() == expected.keys() and any("lora_" in name for name in trained)
    for name in trained:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-3, atol=1e-5)


def _reloads(folder: Path, trained_path: Path) -> None:
    """The trainable-only checkpoint written from the shards reloads with from_pretrained, weights intact."""
    from speechlm import SpeechLMModel

    trained = torch.load(trained_path)
    reloaded = dict(SpeechLMModel.from_pretrained(folder).named_parameters())
    for name in trained:
        torch.testing.assert_close(reloaded[name].detach(), trained[name], atol=0, rtol=0)


def test_fsdp2_on_two_cpu_processes_matches_one_process(tiny_dirs, loop_reference, tmp_path):
    sharded = _distributed(tiny_dirs, tmp_path / "fsdp", "--fsdp")
    single = json.loads((loop_reference / "summary.json").read_text())

    # The wrap policy comes from both sub-models' _no_split_modules; every parameter became a DTensor shard.
    assert sharded["layer_classes"] == ["WhisperEncoderLayer", "Qwen2DecoderLayer"]
    assert sharded["world_size"] == 2 and sharded["sharded"] == sharded["parameters"]
    # Frozen encoder and LLM beside a trainable projector and LoRA adapters inside the same units.
    assert sharded["trainable"] == single["trainable"]
    # The same loss curve and trained weights as one process on the whole batch.
    _same_training(tmp_path / "fsdp", loop_reference)
    _reloads(tmp_path / "fsdp" / "trainable", tmp_path / "fsdp" / "trained.pt")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_on_two_cpu_processes_matches_one_process(stage, tiny_dirs, trainer_reference, tmp_path):
    """DeepSpeed ZeRO through transformers' Trainer (`TrainingArguments(deepspeed=deepspeed_config(stage))`) on 2 CPU
    processes (DeepSpeed's CPU accelerator, gloo): frozen encoder and LLM, trainable projector and LoRA."""
    pytest.importorskip("deepspeed")
    summary = _distributed(tiny_dirs, tmp_path / stage, "--trainer", stage)
    assert summary["deepspeed"] and summary["world_size"] == 2
    # ZeRO-3 partitions the parameters over the ranks; ZeRO-2 only gradients and optimizer state.
    assert summary["partitioned"] == (stage == "zero3")
    assert summary["trainable"] == json.loads((trainer_reference / "summary.json").read_text())["trainable"]
    _same_training(tmp_path / stage, trainer_reference)
    # Under ZeRO-3 the trainable-only checkpoint is written from gathered partitions (save_trainable_only).
    _reloads(tmp_path / stage / "trainable", tmp_path / stage / "trained.pt")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero2", "zero3"])
def test_gradient_checkpointing_with_frozen_encoder(strategy, tiny_dirs, loop_reference, trainer_reference,
                                                    tmp_path):
    """Non-reentrant gradient checkpointing with the encoder and the LLM frozen (only the projector and LoRA train):
    the checkpointed layers get no input that requires grad in the encoder, yet training runs and gives the losses
    and weights of the run without checkpointing (the one-process reference, which every strategy reproduces)."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    options = ["--fsdp"] if strategy == "fsdp2" else ["--trainer", strategy]
    summary = _distributed(tiny_dirs, tmp_path / strategy, *options, "--checkpointing")
    assert summary["checkpointing"] and summary["world_size"] == 2
    assert summary["checkpointed_layers"] == {"encoder": 2, "decoder": 2}
    _same_training(tmp_path / strategy, loop_reference if strategy == "fsdp2" else trainer_reference)


def test_fsdp_layer_classes_cover_every_family(build):
    from speechlm.training import fsdp_layer_classes

    _, model = build("wav2vec2-layer", "gpt2", dtype=torch.float32)
    classes = fsdp_layer_classes(model)
    present = {type(m).__name__ for m in model.modules()}
    assert set(classes) <= present and classes[-1] == "GPT2Block"
    assert classes[0] == "Wav2Vec2EncoderLayerStableLayerNorm"  # Wav2Vec2 declares no _no_split_modules


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_two_node_rendezvous_on_loopback_trains(base_config, tmp_path):  # noqa: F811
    """Two torchrun agents, one process each, meet through a c10d rendezvous on 127.0.0.1 as node 0 and node 1."""
    config = base_config(tmp_path / "nodes", training={"max_steps": 3, "save_steps": 3, "eval_steps": 3,
                                                       "report_to": []})  # fmt: skip
    config["data"]["eval_manifest"] = None
    config_path = tmp_path / "nodes.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = _free_port()
    agents = []
    for node_rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_id", "speechlm-test",
                   "--rdzv_endpoint", f"127.0.0.1:{port}", "--local_addr", "127.0.0.1",
                   "-m", "speechlm.cli", "train", "--config", str(config_path)]  # fmt: skip
        env = {**_env(), "MASTER_ADDR": "127.0.0.1"}
        agents.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outputs = [agent.communicate(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err.decode()[-4000:]
    stage = _summary(tmp_path / "nodes")["stages"][0]
    assert stage["world_size"] == 2 and stage["ranks_agree"] and stage["global_step"] == 3
    stage_dir = tmp_path / "nodes" / "stages" / "01-lora"
    hashes = [(stage_dir / f"weights_sha256.rank{rank}.txt").read_text().strip() for rank in (0, 1)]
    assert hashes[0] == hashes[1]
    assert os.path.isfile(tmp_path / "nodes" / "model.safetensors")

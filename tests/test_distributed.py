"""Beyond one process on CPU: FSDP2 (torch's fully_shard over gloo) against one process on the same global batch,
and a 2-"node" torchrun rendezvous (c10d on 127.0.0.1) running `speechlm train`.

Each test launches 2 processes with one thread each; only 127.0.0.1 is used.
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


def test_fsdp2_on_two_cpu_processes_matches_one_process(model_dirs, tmp_path):
    from speechlm import SpeechLMModel

    encoder, decoder = str(model_dirs("encoder", "whisper")), str(model_dirs("decoder", "qwen2"))
    _run([sys.executable, str(WORKER), encoder, decoder, str(tmp_path / "single"), "--lora"])
    _run(_torchrun("--standalone", "--nproc_per_node", "2", str(WORKER), encoder, decoder,
                   str(tmp_path / "fsdp"), "--lora", "--fsdp"))
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    sharded = json.loads((tmp_path / "fsdp" / "summary.json").read_text())

    # The wrap policy comes from both sub-models' _no_split_modules; every parameter became a DTensor shard.
    assert sharded["layer_classes"] == ["WhisperEncoderLayer", "Qwen2DecoderLayer"]
    assert sharded["world_size"] == 2 and sharded["sharded"] == sharded["parameters"]
    # Frozen encoder and LLM beside a trainable projector and LoRA adapters inside the same units.
    assert sharded["trainable"] == single["trainable"] and any("lora_" in n for n in sharded["trainable"])
    # The same loss curve as one process on the whole batch, and it falls.
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), rtol=1e-3, atol=0)
    assert sharded["losses"][-1] < sharded["losses"][0]
    # The same trained weights.
    ours, reference = (torch.load(tmp_path / name / "trained.pt") for name in ("fsdp", "single"))
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-3, atol=1e-5)
    # The trainable-only checkpoint gathered from the shards reloads with from_pretrained, weights intact.
    model = SpeechLMModel.from_pretrained(tmp_path / "fsdp" / "trainable")
    reloaded = dict(model.named_parameters())
    for name in ours:
        torch.testing.assert_close(reloaded[name].detach(), ours[name], atol=0, rtol=0)


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

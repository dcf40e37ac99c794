"""Shared training fixtures: six synthetic clips with their manifests, and a one-stage config on tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from tests.conftest import make_clips
from tests.tiny_models import CORPUS

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["call mom tomorrow morning", "play some jazz music", "set an alarm for seven thirty",
         "turn off the kitchen lights", "remind me to buy milk", "what is the weather in paris"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six distinct synthetic clips with CORPUS sentences; eval = the first three."""
    root = tmp_path_factory.mktemp("corpus")
    clips = make_clips(seconds=(0.5, 0.7, 0.6, 0.9, 0.4, 0.8), seed=1)
    rows = []
    for index, (clip, text) in enumerate(zip(clips, TEXTS)):
        assert text in CORPUS
        sf.write(root / f"{index}.wav", clip, 16000)
        rows.append({"audio": f"{index}.wav", "text": text, "id": f"u{index}"})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return root


@pytest.fixture(scope="module")
def base_config(corpus, model_dirs):
    def make(output_dir: Path, **sections) -> dict:
        config = {
            "model": {"encoder": str(model_dirs("encoder", "whisper")), "decoder": str(model_dirs("decoder", "qwen2")),
                      "projector_hidden_size": 32},
            "data": {"train_manifest": str(corpus / "train.jsonl"), "eval_manifest": str(corpus / "eval.jsonl"),
                     "prompt": "transcribe"},
            "training": {"output_dir": str(output_dir), "max_steps": 8, "per_device_train_batch_size": 2,
                         "per_device_eval_batch_size": 3, "learning_rate": 0.01, "warmup_steps": 0.25,
                         "logging_steps": 1, "eval_steps": 4, "save_steps": 4, "report_to": ["tensorboard"]},
            "evaluation": {"max_new_tokens": 3, "batch_size": 3},
            # A tiny random LLM cannot move its frozen head and norms enough for LoRA alone to lower the loss visibly
            # in 8 steps, so this stage trains the whole decoder plus LoRA adapters (dropout exercises the RNG state).
            "stages": [{"name": "lora", "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
                        "train_decoder": True}],
        }  # fmt: skip
        for section, values in sections.items():
            if isinstance(values, dict):
                config[section].update(values)
            else:
                config[section] = values
        return config

    return make


@pytest.fixture
def config_path(tmp_path):
    """A two-stage YAML config with a LoRA stage (names only: nothing is loaded)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"encoder": "enc", "decoder": "dec"}, "data": {"train_manifest": "train.jsonl"},
        "stages": [{"name": "projector", "max_steps": 10}, {"name": "lora", "lora": {"r": 4}}],
    }))  # fmt: skip
    return path


def _env() -> dict:
    # One thread per process: the test machine's cores are shared, and two DDP ranks must not fight over them. A rank
    # that dies on a signal prints where its Python code was (faulthandler), so a failure names its place.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def _summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "training_summary.json").read_text())

"""Training end to end on tiny models: loss goes down, a killed run resumes exactly, stages, DDP, merge-lora."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml

from speechlm import cli
from speechlm.training import TrainConfig, load_config, train
from tests.conftest import make_clips
from tests.tiny_models import CORPUS

ROOT = Path(__file__).resolve().parents[1]
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
                      "projection_hidden_size": 32},
            "data": {"train_manifest": str(corpus / "train.jsonl"), "eval_manifest": str(corpus / "eval.jsonl"),
                     "prompt": "transcribe"},
            "training": {"output_dir": str(output_dir), "max_steps": 8, "per_device_train_batch_size": 2,
                         "per_device_eval_batch_size": 3, "learning_rate": 0.01, "warmup_steps": 0.25,
                         "logging_steps": 1, "eval_steps": 4, "save_steps": 4, "report_to": ["tensorboard"]},
            "evaluation": {"max_new_tokens": 3, "batch_size": 3},
            # A tiny random LLM cannot move its frozen head and norms enough for LoRA alone to lower the loss visibly
            # in 8 steps, so this stage trains the whole decoder plus LoRA adapters (dropout exercises the RNG state).
            "stages": [{"name": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}, "train_decoder": True}],
        }  # fmt: skip
        for section, values in sections.items():
            if isinstance(values, dict):
                config[section].update(values)
            else:
                config[section] = values
        return config

    return make


def _env() -> dict:
    # One thread per process: the test machine's cores are shared, and two DDP ranks must not fight over them.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "training_summary.json").read_text())


def _stage_state(checkpoint: Path) -> tuple[dict, dict, list]:
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    scheduler = torch.load(checkpoint / "scheduler.pt", weights_only=False)
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return optimizer, scheduler, history


KILL_AT_STEP_4 = """
import os, signal, sys, yaml
from transformers import TrainerCallback
from speechlm.training import train

class KillAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # called once checkpoint-N is complete on disk
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

train(yaml.safe_load(open(sys.argv[1])), callbacks=[KillAfterCheckpoint()])
"""


def test_train_kill_resume_evaluate(base_config, corpus, tmp_path, capsys):
    from speechlm import SpeechLMModel, SpeechLMProcessor

    # 1. An uninterrupted run: the loss goes down and the folder is a loadable model with its report.
    reference = train(base_config(tmp_path / "reference"))
    summary = _summary(reference)["stages"][0]
    log = json.loads((reference / "stages" / "01-lora" / "stage_done.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert [e["step"] for e in log if "eval_wer" in e] == [4, 8] and summary["global_step"] == 8
    for name in ("training_curves.png", "training_report.md", "config.yaml", "model.safetensors",
                 "speechlm_processor.json"):
        assert (reference / name).is_file(), name
    assert list((reference / "stages" / "01-lora" / "runs").glob("*/events.out.tfevents.*"))
    assert "| lora | 8 |" in (reference / "training_report.md").read_text()
    model = SpeechLMModel.from_pretrained(reference)
    assert model.config.lora["r"] == 8 and SpeechLMProcessor.from_pretrained(reference).prompt == "transcribe"

    # 2. The same run killed (SIGKILL, no cleanup) right after checkpoint-4 is written.
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(base_config(tmp_path / "killed")))
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILL_AT_STEP_4))
    killed = subprocess.run([sys.executable, str(script), str(config_path)], env=_env(), capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-3000:]
    stage_dir = tmp_path / "killed" / "stages" / "01-lora"
    assert (stage_dir / "checkpoint-4").is_dir() and not (stage_dir / "stage_done.json").exists()
    SpeechLMModel.from_pretrained(stage_dir / "checkpoint-4")  # a checkpoint is a usable model + processor too
    SpeechLMProcessor.from_pretrained(stage_dir / "checkpoint-4")
    with pytest.raises(SystemExit, match="pass --resume to continue it"):
        cli.main(["train", "--config", str(config_path)])

    # 3. --resume: same final step, and the optimizer, scheduler, data order and RNG continued exactly.
    assert cli.main(["train", "--config", str(config_path), "--resume"]) == 0
    resumed = _summary(tmp_path / "killed")
    assert resumed["global_step"] == 8
    # Equal up to float noise: the killed process ran with another thread count (another summation order), while a
    # wrong data order, optimizer or scheduler state would be off by orders of magnitude more.
    from safetensors.torch import load_file

    expected, got = load_file(reference / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4, msg=name)
    ref_optimizer, ref_scheduler, ref_log = _stage_state(reference / "stages" / "01-lora" / "checkpoint-8")
    optimizer, scheduler, log = _stage_state(stage_dir / "checkpoint-8")
    assert all(int(state["step"]) == 8 for state in optimizer["state"].values())
    for key, state in optimizer["state"].items():
        torch.testing.assert_close(state["exp_avg_sq"], ref_optimizer["state"][key]["exp_avg_sq"], atol=1e-6, rtol=1e-3)
    assert scheduler["last_epoch"] == ref_scheduler["last_epoch"] == 8
    assert [e.get("learning_rate") for e in log] == [e.get("learning_rate") for e in ref_log]
    assert [e.get("loss") for e in log] == pytest.approx([e.get("loss") for e in ref_log])

    # 4. speechlm evaluate on the result prints a WER.
    capsys.readouterr()
    argv = ["evaluate", str(corpus / "eval.jsonl"), "--model", str(tmp_path / "killed"), "--max-new-tokens", "3",
            "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "WER: " in capsys.readouterr().out


def test_stages_encoder_cache_and_finished_resume(base_config, corpus, tmp_path):
    import datasets

    rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    hf = datasets.Dataset.from_dict({"audio": [str(corpus / r["audio"]) for r in rows],
                                     "sentence": [r["text"] for r in rows]}).cast_column("audio", datasets.Audio())
    hf.save_to_disk(tmp_path / "hf")  # a datasets folder works wherever a manifest does
    stages = [
        {"name": "projector", "max_steps": 2, "learning_rate": 0.01},
        {"name": "lora", "max_steps": 2, "lora": {"r": 2}},
        {"name": "encoder", "max_steps": 2, "train_encoder": True, "learning_rate": 1e-4},
    ]
    data = {"encoder_cache": "memory", "eval_manifest": None, "train_manifest": str(tmp_path / "hf"),
            "text_column": "sentence"}
    config = base_config(tmp_path / "run", stages=stages, data=data, training={"report_to": [], "save_steps": 2})
    output = train(config)
    summary = _summary(output)
    assert [s["stage"] for s in summary["stages"]] == ["projector", "lora", "encoder"]
    assert [s["global_step"] for s in summary["stages"]] == [2, 2, 2]
    assert [s["encoder_cache"] for s in summary["stages"]] == ["memory", "memory", None]  # the encoder trains last
    trainable = [s["trainable_parameters"] for s in summary["stages"]]
    assert trainable[0] < trainable[1] < trainable[2]
    assert (output / "stages" / "01-projector" / "final" / "model.safetensors").is_file()
    assert "| encoder | 2 |" in (output / "training_report.md").read_text()
    assert train(config, resume=True) == output  # nothing left to do
    with pytest.raises(FileExistsError):
        train(config)


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


def test_config_overrides_and_validation(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"encoder": "enc", "decoder": "dec"}, "data": {"train_manifest": "train.jsonl"},
        "stages": [{"name": "projector", "max_steps": 10}, {"name": "lora", "lora": {"r": 4}}],
    }))  # fmt: skip
    config = load_config(path, {"training.max_steps": 20, "stages.1.learning_rate": 1e-3, "stages.1.lora.r": 8})
    assert config.training.max_steps == 20 and config.stages[0].training == {"max_steps": 10}
    assert config.stages[1].training == {"learning_rate": 1e-3} and config.stages[1].lora == {"r": 8}
    assert TrainConfig.from_dict(config.to_dict()) == config  # the saved config.yaml reloads to the same config

    with pytest.raises(ValueError, match=r"unknown key 'max_step' in training \(did you mean 'max_steps'\?\)"):
        load_config(path, {"training.max_step": 1})
    with pytest.raises(ValueError, match=r"unknown key 'lr' in stages\[0\]"):
        load_config(path, {"stages.0.lr": 1})
    with pytest.raises(ValueError, match="needs model.encoder and model.decoder"):
        TrainConfig.from_dict({"data": {"train_manifest": "x"}})

    argv = ["train", "--config", str(path), "--training.max_steps", "7", "--training.report_to", "[]",
            "--data.encoder_cache", "null", "--set", "stages.0.learning_rate=0.01", "--print-config"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["max_steps"] == 7 and printed["training"]["report_to"] == []
    assert printed["stages"][0]["training"] == {"max_steps": 10, "learning_rate": 0.01}
    with pytest.raises(SystemExit, match="unknown key 'bogus'"):
        cli.main(["train", "--config", str(path), "--set", "model.bogus=1"])


SLU = {"call mom tomorrow morning": '{"intent": "call", "contact": "mom", "date": "tomorrow morning"}',
       "play some jazz music": '{"intent": "play_music", "genre": "jazz"}',
       "set an alarm for seven thirty": '{"intent": "set_alarm", "time": "seven thirty"}'}  # fmt: skip


@pytest.fixture(scope="module")
def two_task_corpus(corpus):
    """The corpus's first three clips twice: transcribed, and read as intent + slots in JSON."""
    rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()][:3]
    tasks = [{**row, "audio": str(corpus / row["audio"]), "task": "transcribe", "id": f"t-{row['id']}"} for row in rows]
    tasks += [{**row, "audio": str(corpus / row["audio"]), "task": "slu", "text": SLU[row["text"]],
               "id": f"s-{row['id']}"} for row in rows]  # fmt: skip
    (corpus / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tasks))
    (corpus / "tasks-eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tasks[1:5]))
    return corpus


@pytest.fixture(scope="module")
def two_task_run(base_config, two_task_corpus, tmp_path_factory):
    """Two steps on transcription + SLU, evaluated once on two rows of each task."""
    output = tmp_path_factory.mktemp("tasks") / "run"
    config = base_config(output, data={"train_manifest": str(two_task_corpus / "tasks.jsonl"),
                                       "eval_manifest": str(two_task_corpus / "tasks-eval.jsonl"),
                                       "task_prompts": {"transcribe": "transcribe", "slu": "intent as json"}},
                         training={"max_steps": 2, "eval_steps": 2, "save_steps": 2, "report_to": []},
                         evaluation={"task_metrics": {"slu": "json"}})  # fmt: skip
    train(config)
    return output


def _evaluations(output: Path) -> dict:
    log = json.loads((output / "stages" / "01-lora" / "stage_done.json").read_text())["log_history"]
    merged = {}
    for entry in log:
        merged.update({key: value for key, value in entry.items() if key.startswith("eval_")})
    return merged


def test_several_eval_tasks_give_a_loss_each_and_a_pooled_loss(two_task_run):
    metrics = _evaluations(two_task_run)
    assert {"eval_transcribe_loss", "eval_slu_loss", "eval_loss"} <= set(metrics)
    # tasks-eval.jsonl holds 2 transcription and 2 SLU rows: the pooled loss is their size-weighted mean
    expected = (2 * metrics["eval_transcribe_loss"] + 2 * metrics["eval_slu_loss"]) / 4
    assert metrics["eval_loss"] == pytest.approx(expected)


def test_several_eval_tasks_are_scored_by_their_kinds(two_task_run):
    metrics = _evaluations(two_task_run)
    assert {"eval_transcribe_wer", "eval_transcribe_cer", "eval_slu_valid_json", "eval_slu_intent_accuracy",
            "eval_slu_slot_f1", "eval_wer"} <= set(metrics)
    assert metrics["eval_wer"] == metrics["eval_transcribe_wer"]  # the only transcription task
    final = _summary(two_task_run)["final_metrics"]
    assert {"loss", "slu_loss", "slu_slot_f1", "wer"} <= set(final) and "runtime" not in final


def test_task_metric_kinds_are_validated():
    with pytest.raises(ValueError, match="unknown task metric kind 'bleu'"):
        TrainConfig.from_dict({"model": {"encoder": "e", "decoder": "d"}, "data": {"train_manifest": "x"},
                               "evaluation": {"task_metrics": {"slu": "bleu"}}})


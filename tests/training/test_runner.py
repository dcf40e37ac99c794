"""`train()` end to end on tiny models (speechlm/training/runner.py): the loss goes down, a killed run resumes
exactly, stages run in order from a datasets folder with the encoder cache, several eval tasks are scored apart."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from speechlm import cli
from speechlm.training import train
from tests.training.conftest import _env, _summary


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


def test_distill_weight_turns_distillation_on_for_every_batch(base_config, two_task_corpus, tmp_path):
    """`training.distill_weight` reaches the collator: an SLU row without its transcript is refused by name."""
    config = base_config(tmp_path / "run", data={"train_manifest": str(two_task_corpus / "tasks.jsonl"),
                                                 "eval_manifest": None},
                         training={"max_steps": 2, "save_steps": 2, "report_to": [], "distill_weight": 1.0})
    with pytest.raises(ValueError, match="distillation needs the `transcript` of a 'slu' example"):
        train(config)


def test_text_rows_are_read_from_the_configs_text_examples(base_config, corpus, tmp_path):
    """`training.text_rows` reaches the collator through `data.text_examples`: a row without a prompt (its task
    has none) is refused by file and line before a step is taken."""
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"transcript": "call mom", "text": "call", "task": "slu"}) + "\n")
    config = base_config(tmp_path / "run", data={"eval_manifest": None, "text_examples": str(text)},
                         training={"max_steps": 2, "save_steps": 2, "report_to": [], "text_rows": 2})
    with pytest.raises(ValueError, match=f"{text}:1: needs a prompt, or a task with one in task_prompts"):
        train(config)

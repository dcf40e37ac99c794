"""Training: a YAML config (+ CLI overrides) -> staged fine-tuning on transformers' `Trainer` -> a SpeechLM folder.

    speechlm train --config speechlm/configs/train_example.yaml --training.max_steps 20 --set stages.0.max_steps=5
    speechlm train --config cfg.yaml --resume          # continue a killed run exactly where its last checkpoint was
    speechlm merge-lora runs/asr runs/asr-merged       # fold LoRA into the decoder for serving

Stages run one after another, each a `Trainer` run of its own under `OUTPUT/stages/NN-name/` (checkpoints,
TensorBoard logs): the usual recipe is projector only (align audio to the LLM's embedding space while everything
else is frozen), then projector + LoRA on the decoder, then optionally the encoder unfrozen. A stage starts from the
previous stage's final weights; the last stage writes the model and its processor to `OUTPUT/` itself, so
`SpeechLMModel.from_pretrained(OUTPUT)` / `SpeechLMProcessor.from_pretrained(OUTPUT)` load the result, next to
`training_curves.png`, `training_report.md` and `training_summary.json`.

Resuming (`--resume` / `train(..., resume=True)`) skips finished stages and hands the current stage's last
checkpoint to `Trainer.train(resume_from_checkpoint=...)`: weights, optimizer, scheduler, RNG states and the data
position come back, so a killed run ends with the same step count and the same weights as an uninterrupted one.

Distributed training uses the engines transformers' `Trainer` already drives, nothing of our own:

    torchrun --nproc_per_node 2 -m speechlm.cli train --config cfg.yaml                  # DDP: NCCL, or gloo on CPU
    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml -m speechlm.cli train --config cfg.yaml
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m speechlm.cli train --config cfg.yaml
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m speechlm.cli train --config cfg.yaml

`ddp_cpu.yaml` is DDP with 2 processes (CPU processes over gloo where there is no GPU), `fsdp.yaml` shards
parameters, gradients and optimizer state (FSDP2, one unit per encoder/decoder layer: `fsdp_layer_classes`; GPUs
only under accelerate, while `apply_fully_shard` runs torch's fully_shard on CPU too), `deepspeed_zero2.yaml` shards
optimizer state and gradients (needs `pip install deepspeed`); set `num_processes` to the GPU count. On CPU, give each
process `OMP_NUM_THREADS=cores/processes`. `per_device_train_batch_size` is per process. Evaluation (loss and WER)
is sharded over the processes and gathered. Every rank hashes its trainable weights at the end;
`training_summary.json` records whether they agree. FSDP shards the weights, so the WER pass (plain `generate`) is
skipped there: run `speechlm evaluate` on the saved model instead. Multi-node launches: docs/scaling.md.

The package, one concept a module: `config` (schema, YAML, overrides), `stages` (the model and what each stage
trains), `trainer` (the `Trainer` subclass, `TrainingArguments`), `distillation` (the KL to the text-only LLM
reading the transcript), `distributed` (FSDP2 helpers, rank checks),
`checkpoints` (what a resume starts from), `runner` (`train()`: data, stages, resume), `report` (curves and report),
`cli` (`speechlm train`, `speechlm merge-lora`). Names are imported on first use, so that importing the package (and
`speechlm train --help`) does not load torch.
"""

from __future__ import annotations

import importlib

# name -> (module, attribute): the public surface, as `from speechlm.training import X` has always offered it.
_EXPORTS = {
    **{name: ("config", name) for name in (
        "DataConfig", "EvaluationConfig", "ModelConfig", "StageConfig", "TrainConfig", "TrainingOptions",
        "load_config", "parse_value", "set_by_path")},
    **{name: ("stages", name) for name in ("apply_stage", "build_model_and_processor", "count_parameters")},
    **{name: ("trainer", name) for name in ("SpeechLMTrainer", "make_training_arguments", "resolve_precision")},
    **{name: ("distributed", name) for name in (
        "apply_fully_shard", "fsdp_layer_classes", "full_state_dict", "trainable_weights_sha256")},
    **{name: ("checkpoints", name) for name in ("CheckpointError", "checkpoint_problem")},
    **{name: ("runner", name) for name in ("STAGE_DONE_NAME", "train")},
    **{name: ("report", name) for name in ("SUMMARY_NAME", "plot_training_curves")},
    **{name: ("cli", name) for name in (
        "add_arguments", "add_merge_lora_arguments", "add_train_arguments", "config_from_args",
        "merge_lora_checkpoint", "run", "run_merge_lora", "run_train")},
}  # fmt: skip

__all__ = [
    "CheckpointError",
    "DataConfig",
    "EvaluationConfig",
    "ModelConfig",
    "StageConfig",
    "TrainConfig",
    "SpeechLMTrainer",
    "TrainingOptions",
    "apply_fully_shard",
    "apply_stage",
    "build_model_and_processor",
    "checkpoint_problem",
    "fsdp_layer_classes",
    "full_state_dict",
    "load_config",
    "merge_lora_checkpoint",
    "train",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    globals()[name] = value  # once resolved, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

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
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed

logger = logging.getLogger(__name__)

SUMMARY_NAME = "training_summary.json"
STAGE_DONE_NAME = "stage_done.json"


# ------------------------------------------------------------------------------------------------------------ config
@dataclass
class ModelConfig:
    """Where the model comes from: a pretrained encoder + LLM pair, or `init_from` a SpeechLM folder."""

    encoder: str | None = None
    decoder: str | None = None
    init_from: str | None = None
    projection_hidden_size: int = 1024
    encoder_dropout: float = 0.0
    stack_factor: int | None = None
    audio_layout: str = "prefix"
    dtype: str | None = "float32"
    attn_implementation: str | None = None
    gguf_file: str | None = None


@dataclass
class DataConfig:
    """Manifests (JSONL, or a folder written by `datasets.save_to_disk`) and how prompts and audio are handled."""

    train_manifest: str | list[str] | None = None
    eval_manifest: str | list[str] | None = None
    on_error: str = "raise"
    probe_audio: bool = True
    min_seconds: float | None = None
    max_seconds: float | None = None
    max_eval_samples: int | None = None
    audio_column: str = "audio"
    text_column: str = "text"
    prompt: str | None = None
    use_chat_template: bool = False
    task_prompts: dict[str, str] = field(default_factory=dict)
    encoder_cache: str | None = None
    encoder_cache_dir: str | None = None


@dataclass
class TrainingOptions:
    """The optimisation settings; a stage may override any of them. `extra` reaches `TrainingArguments` as is."""

    output_dir: str = "runs/speechlm"
    max_steps: int = 1000
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int | None = 200
    save_steps: int = 200
    save_total_limit: int | None = 2
    seed: int = 42
    group_by_length: bool = True
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    dataloader_num_workers: int = 0
    overwrite_output_dir: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationConfig:
    """The decoding pass on `data.eval_manifest` at every evaluation (greedy by default): WER, or each task's own
    metrics (`task_metrics: {task: transcription|json|answer}`, else inferred: see `speechlm.tasks`)."""

    wer: bool = True
    batch_size: int = 8
    max_new_tokens: int = 128
    num_beams: int = 1
    prompt: str | None = None
    task_metrics: dict[str, str] = field(default_factory=dict)


@dataclass
class StageConfig:
    """What trains in one stage. `lora` adds adapters when the stage starts (once); other keys override `training`."""

    name: str = "projector"
    train_projector: bool = True
    train_encoder: bool = False
    train_decoder: bool = False
    train_lora: bool = True
    lora: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build and validate; unknown keys are errors (with a suggestion), not silently ignored typos."""
        values = dict(values or {})
        _check_keys(values, {f.name for f in dataclasses.fields(cls)}, "config")
        sections = {
            name: _section(kind, values.get(name) or {}, name)
            for name, kind in (("model", ModelConfig), ("data", DataConfig), ("training", TrainingOptions),
                               ("evaluation", EvaluationConfig))
        }  # fmt: skip
        stages = values.get("stages")
        if stages is None:
            stages = [{}]
        if not isinstance(stages, list) or not stages:
            raise ValueError("config 'stages' must be a non-empty list of stage settings")
        config = cls(**sections, stages=[_stage(raw, index) for index, raw in enumerate(stages)])
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.model.init_from is None and not (self.model.encoder and self.model.decoder):
            raise ValueError("config needs model.encoder and model.decoder (or model.init_from a SpeechLM folder)")
        if not self.data.train_manifest:
            raise ValueError("config needs data.train_manifest")
        if self.data.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.data.on_error!r}")
        if self.data.encoder_cache not in (None, "memory", "disk"):
            raise ValueError(f"data.encoder_cache must be null, 'memory' or 'disk', got {self.data.encoder_cache!r}")
        if self.training.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"training.precision must be auto, fp32, bf16 or fp16, got {self.training.precision!r}")
        from .tasks import parse_task_metrics

        parse_task_metrics([f"{task}={kind}" for task, kind in self.evaluation.task_metrics.items()])
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")


def _check_keys(values: dict, known: set[str], where: str) -> None:
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(known))}"
            raise ValueError(f"unknown key {key!r} in {where}{hint}")


def _section(kind, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"config section {where!r} must be a mapping, got {type(values).__name__}")
    _check_keys(values, {f.name for f in dataclasses.fields(kind)}, where)
    return kind(**copy.deepcopy(values))


def _stage(raw: dict, index: int) -> StageConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"stages[{index}] must be a mapping, got {type(raw).__name__}")
    own = {f.name for f in dataclasses.fields(StageConfig)} - {"training"}
    training_keys = {f.name for f in dataclasses.fields(TrainingOptions)} - {"output_dir"}
    stage_values = {k: v for k, v in raw.items() if k in own}
    overrides = dict(raw.get("training") or {})
    overrides.update({k: v for k, v in raw.items() if k not in own and k != "training"})
    _check_keys(overrides, training_keys, f"stages[{index}]")
    stage = StageConfig(**copy.deepcopy(stage_values), training=overrides)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", stage.name):
        raise ValueError(f"stages[{index}].name must be letters, digits, '_', '-' or '.', got {stage.name!r}")
    if stage.lora is not None:
        _check_keys(stage.lora, {"r", "alpha", "dropout", "target_modules"}, f"stages[{index}].lora")
    return stage


def set_by_path(values: dict, dotted: str, value: Any) -> None:
    """`set_by_path(cfg, "stages.1.max_steps", 5)`: dict keys and list indices, creating missing dicts."""
    parts = dotted.split(".")
    target: Any = values
    for position, part in enumerate(parts[:-1]):
        if isinstance(target, list):
            target = target[int(part)]
        else:
            nxt = target.get(part)
            if nxt is None:
                nxt = [] if parts[position + 1].isdigit() else {}
                target[part] = nxt
            target = nxt
    last = parts[-1]
    if isinstance(target, list):
        index = int(last)
        while len(target) <= index:
            target.append({})
        target[index] = value
    else:
        target[last] = value


def parse_value(text: str) -> Any:
    """CLI values are YAML: `20` -> 20, `null` -> None, `[a, b]` -> a list, anything else stays a string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A YAML file (optional) with dotted-key `overrides` applied on top, validated."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a training config must be a YAML mapping")
    for key, value in (overrides or {}).items():
        set_by_path(values, key, value)
    return TrainConfig.from_dict(values)


# ------------------------------------------------------------------------------------------------------------- model
def build_model_and_processor(config: TrainConfig, init_from: str | os.PathLike | None = None):
    """(processor, model): fresh from the encoder/decoder pair, or loaded from a SpeechLM folder (a previous stage)."""
    from .factory import create_speech_lm_model
    from .modeling import SpeechLMModel
    from .processing import DEFAULT_PROMPT, SpeechLMProcessor

    source = init_from or config.model.init_from
    dtype = config.model.dtype
    if source is not None:
        model = SpeechLMModel.from_pretrained(source, **({"dtype": dtype} if dtype else {}))
        processor = SpeechLMProcessor.from_pretrained(source)
        if config.data.prompt is not None:
            processor.prompt = config.data.prompt
        return processor, model
    m = config.model
    feature_extractor, tokenizer, model = create_speech_lm_model(
        m.encoder, m.decoder, projection_hidden_size=m.projection_hidden_size, encoder_dropout=m.encoder_dropout,
        stack_factor=m.stack_factor, audio_layout=m.audio_layout, dtype=dtype,
        attn_implementation=m.attn_implementation, gguf_file=m.gguf_file,
    )  # fmt: skip
    prompt = config.data.prompt if config.data.prompt is not None else DEFAULT_PROMPT
    processor = SpeechLMProcessor(feature_extractor, tokenizer, audio_layout=m.audio_layout, prompt=prompt,
                                  use_chat_template=config.data.use_chat_template)
    return processor, model


def apply_stage(model, stage: StageConfig) -> None:
    """Freeze/unfreeze for `stage` (adding its LoRA adapters first if the decoder has none yet)."""
    if stage.lora and not model.config.lora:  # config.lora is set whenever the decoder carries adapters
        lora = dict(stage.lora)
        model.add_lora(r=lora.get("r", 16), alpha=lora.get("alpha", 32), dropout=lora.get("dropout", 0.05),
                       target_modules=lora.get("target_modules"))
    model.freeze_encoder(not stage.train_encoder)
    model.freeze_decoder(not stage.train_decoder)
    if not stage.train_lora:
        for name, param in model.language_model.named_parameters():
            if "lora_" in name:
                param.requires_grad = False
    model.freeze_projection(not stage.train_projector)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"stage {stage.name!r} trains nothing: enable the projector, LoRA, the encoder or the decoder")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def trainable_weights_sha256(model) -> str:
    """Hash of the trainable weights: equal on every DDP rank when the replicas stayed in sync."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fsdp_layer_classes(model) -> list[str]:
    """Names of the layer classes FSDP should shard one by one: the union of the encoder's and the LLM's own
    `_no_split_modules` (e.g. WhisperEncoderLayer + Qwen2DecoderLayer), restricted to classes the model holds; a
    sub-model that declares none (Wav2Vec2) contributes its longest stack of identical attention layers.

    accelerate's TRANSFORMER_BASED_WRAP reads `model._no_split_modules` when `fsdp_transformer_layer_cls_to_wrap`
    is unset; `speechlm train` sets `model._no_split_modules` from this list.
    """
    present = {type(module).__name__ for module in model.modules()}
    names: list[str] = []
    for part in (model.audio_tower, model.language_model):
        declared = [name for name in getattr(part, "_no_split_modules", None) or () if name in present]
        if not declared:  # e.g. Wav2Vec2 declares none: its longest stack of identical attention layers
            stacks = [m for m in part.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
                      and len({type(x) for x in m}) == 1
                      and any("attention" in name.lower() for name, _ in m[0].named_children())]
            if stacks:
                declared = [type(max(stacks, key=len)[0]).__name__]
        names += [name for name in declared if name not in names]
    return names


def apply_fully_shard(model, mesh=None, reshard_after_forward: bool = True, mp_policy=None):
    """Shard `model` with torch's FSDP2 (`fully_shard`): each layer of `fsdp_layer_classes`, then the root
    (projector, audio start/end, embeddings, CTC head). Frozen and trainable parameters may share a unit: FSDP2
    shards per parameter, and only parameters that require grad get gradients. Works on CPU over gloo and on
    GPUs over NCCL; `mesh` defaults to one dimension over every process on the model's device type."""
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    classes = set(fsdp_layer_classes(model))
    for module in list(model.modules()):
        if type(module).__name__ in classes:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every weight of an FSDP2-sharded (or plain) model, gathered and on the CPU, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def resolve_precision(requested: str) -> str:
    """bf16/fp16 only where the hardware runs them natively (CUDA); CPU training stays fp32."""
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16" if bf16 else "fp16" if cuda else "fp32"
    if requested == "bf16" and not bf16:
        logger.warning("bf16 requested but this machine has no bf16-capable GPU: training in fp32")
        return "fp32"
    if requested == "fp16" and not cuda:
        logger.warning("fp16 requested but no CUDA GPU is available: training in fp32")
        return "fp32"
    return requested


# ------------------------------------------------------------------------------------------------------------ trainer
class SpeechLMTrainer(Trainer):
    """`Trainer` with duration-grouped batches and a WER/CER pass added to every evaluation."""

    def __init__(self, *args, wer_records=None, evaluation: EvaluationConfig | None = None, task_prompts=None,
                 ctc_head=None, ctc_weight: float = 0.0, ctc_only: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.wer_records = list(wer_records or [])
        self.evaluation_config = evaluation or EvaluationConfig()
        self._in_task_loop = False
        if self.wer_records and self.evaluation_config.wer:  # a wrong task metric fails now, not at the first eval
            from .tasks import resolve_kinds

            resolve_kinds(self.wer_records, self.evaluation_config.task_metrics)
        self.task_prompts = task_prompts
        # CTC alignment (speechlm.alignment): `ctc_only` skips the LLM pass (pre-alignment), else weight x CTC is added.
        if ctc_head is not None and self.args.world_size > 1:
            raise ValueError("CTC alignment (ctc_head) runs in a single process; drop it for distributed training")
        self.ctc_head = ctc_head.to(self.args.device) if ctc_head is not None else None
        self.ctc_weight, self.ctc_only = ctc_weight, ctc_only

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.ctc_head is not None and not any(
            p is self.ctc_head.blank for group in optimizer.param_groups for p in group["params"]
        ):
            optimizer.add_param_group({"params": list(self.ctc_head.parameters()), "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # `ctc_labels`: the transcript the CTC head aligns the audio with, when the LLM learns another answer
        # (an understanding task on the same clip); never an input of the model itself.
        model_inputs = {key: value for key, value in inputs.items() if key != "ctc_labels"}
        if self.ctc_head is None or not (self.ctc_only or self.ctc_weight):
            return super().compute_loss(model, model_inputs, return_outputs, num_items_in_batch)
        ctc = self.ctc_head(self.accelerator.unwrap_model(model), inputs)
        if self.ctc_only:
            return (ctc, None) if return_outputs else ctc
        loss, outputs = super().compute_loss(model, model_inputs, True, num_items_in_batch)
        loss = loss + self.ctc_weight * ctc
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            from .data import DurationGroupedSampler

            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return DurationGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                          dataset.lengths, seed=seed)
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        # The stock group_by_length eval sampler would decode every clip to measure it; order does not matter here.
        if self.args.world_size <= 1:
            return torch.utils.data.SequentialSampler(eval_dataset)
        return None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self._in_task_loop:  # one task of a per-task eval set: Trainer's dict loop calls back here
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        target = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(target, dict):
            from .tasks import pooled_loss

            self._in_task_loop = True
            try:
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            finally:
                self._in_task_loop = False
            loss = pooled_loss(metrics, {name: len(part) for name, part in target.items()}, metric_key_prefix)
            if loss is not None:
                self.log(loss)
                metrics.update(loss)
        else:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix) if self.eval_dataset else {}
        if self.wer_records and self.evaluation_config.wer:
            wer = self.word_error_rates(metric_key_prefix)
            if wer:
                self.log(wer)
                metrics.update(wer)
        return metrics

    def word_error_rates(self, prefix: str = "eval") -> dict[str, float]:
        """Metrics of the decoded `wer_records`, each process decoding its share (gathered afterwards): WER/CER, or
        with several tasks each task's own (`speechlm.tasks.headline_metrics`) and the WER of the transcription ones.
        """
        from accelerate.utils import gather_object

        from .evaluation import transcribe_records
        from .tasks import headline_metrics, resolve_kinds, score_records, transcription_scores

        if self.is_fsdp_enabled:
            logger.warning("WER during training is skipped under FSDP; run `speechlm evaluate` on the result")
            return {}
        model = self.accelerator.unwrap_model(self.model)
        rank, world = self.args.process_index, self.args.world_size
        shard = list(range(rank, len(self.wer_records), world))
        was_training = model.training
        model.eval()
        cfg = self.evaluation_config
        try:
            hypotheses = transcribe_records(
                model, self.processing_class, [self.wer_records[i] for i in shard], batch_size=cfg.batch_size,
                prompt=cfg.prompt, task_prompts=self.task_prompts, max_new_tokens=cfg.max_new_tokens,
                num_beams=cfg.num_beams,
            )  # fmt: skip
        finally:
            model.train(was_training)
        pairs = list(zip(shard, hypotheses))
        if world > 1:
            pairs = gather_object(pairs)
        by_index = dict(pairs)
        ordered = [by_index[i] for i in range(len(self.wer_records))]
        kinds = resolve_kinds(self.wer_records, cfg.task_metrics)
        scores = score_records(self.wer_records, ordered, kinds)
        return headline_metrics(scores, transcription_scores(self.wer_records, ordered, kinds), prefix)


def make_training_arguments(options: TrainingOptions, output_dir: Path, has_eval: bool, find_unused: bool):
    """`transformers.TrainingArguments` from our options (precision resolved, CPU-friendly distributed defaults)."""
    precision = resolve_precision(options.precision)
    cuda = torch.cuda.is_available()
    eval_steps = options.eval_steps if has_eval else None
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=options.max_steps if options.max_steps and options.max_steps > 0 else -1,
        num_train_epochs=options.num_train_epochs,
        per_device_train_batch_size=options.per_device_train_batch_size,
        per_device_eval_batch_size=options.per_device_eval_batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=options.learning_rate,
        lr_scheduler_type=options.lr_scheduler_type,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=options.logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        seed=options.seed,
        train_sampling_strategy="group_by_length" if options.group_by_length else "random",
        report_to=list(options.report_to or []),
        dataloader_num_workers=options.dataloader_num_workers,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=find_unused,
    )
    if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs.update(use_cpu=True, ddp_backend="gloo")  # CPU-only DDP (torchrun): accelerate's MULTI_CPU over gloo
    if options.gradient_checkpointing:
        # Recent transformers renamed gradient_checkpointing to activation_checkpointing; use whichever exists.
        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        kwargs[name] = True
        kwargs[f"{name}_kwargs"] = {"use_reentrant": False}
    kwargs.update(options.extra or {})
    return TrainingArguments(**kwargs)


# --------------------------------------------------------------------------------------------------------- training
@dataclass
class _Data:
    train: Any
    eval: Any


def _load_source(source: Any, data: DataConfig, on_error: str, sampling_rate: int | None):
    """A manifest path (or list of them), a `save_to_disk` folder, a Manifest, a datasets.Dataset or a list of dicts."""
    from .data import Manifest, load_records, read_manifest, records_from_dataset

    common = dict(min_seconds=data.min_seconds, max_seconds=data.max_seconds, probe_audio=data.probe_audio)
    if isinstance(source, list | tuple) and source and all(isinstance(s, str | os.PathLike) for s in source):
        parts = [_load_source(s, data, on_error, sampling_rate) for s in source]
        return Manifest([r for p in parts for r in p.records], [i for p in parts for i in p.skipped],
                        ", ".join(p.source for p in parts))
    if isinstance(source, str | os.PathLike) and Path(source).is_dir():
        import datasets

        dataset = datasets.load_from_disk(str(source))
        return records_from_dataset(dataset, on_error, data.audio_column, data.text_column, sampling_rate,
                                    name=str(source), **common)
    if isinstance(source, str | os.PathLike):
        return read_manifest(source, on_error, **common)
    if isinstance(source, Manifest):
        return source
    return load_records(source, on_error, audio_column=data.audio_column, text_column=data.text_column,
                        sampling_rate=sampling_rate, **common)


def _stage_dirs(output_dir: Path, stages: list[StageConfig]) -> list[Path]:
    return [output_dir / "stages" / f"{index + 1:02d}-{stage.name}" for index, stage in enumerate(stages)]


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def train(config: dict | TrainConfig, *, resume: bool | str = False, callbacks: list | None = None,
          train_data: Any = None, eval_data: Any = None) -> Path:
    """Run every stage of `config` and return the output folder (model + processor + report).

    `resume=True` continues from the latest checkpoint of the first unfinished stage (a path picks a checkpoint of
    that stage explicitly). `train_data` / `eval_data` replace the config's manifests with in-memory data (a
    `datasets.Dataset`, a `speechlm.data.Manifest` or a list of record dicts). `callbacks` are extra
    `TrainerCallback`s for every stage.
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    options = config.training
    output_dir = Path(options.output_dir)
    stage_dirs = _stage_dirs(output_dir, config.stages)
    if not resume and (output_dir / "stages").exists() and any((output_dir / "stages").iterdir()):
        if not options.overwrite_output_dir:
            raise FileExistsError(
                f"{output_dir} already holds a training run: pass --resume to continue it, choose another "
                "training.output_dir, or set training.overwrite_output_dir: true to start over"
            )
        if _is_main_process():
            shutil.rmtree(output_dir / "stages")
        _barrier()
    output_dir.mkdir(parents=True, exist_ok=True)
    if _is_main_process():
        import yaml

        with open(output_dir / "config.yaml", "w", encoding="utf-8") as handle:
            yaml.safe_dump(config.to_dict(), handle, sort_keys=False, allow_unicode=True)

    first = next((i for i, d in enumerate(stage_dirs) if not (d / STAGE_DONE_NAME).is_file()), None)
    if first is None:
        logger.info("every stage of %s is finished already; nothing to resume", output_dir)
        return output_dir
    init_from = None
    if first > 0:
        init_from = stage_dirs[first - 1] / "final"
        logger.info("stages 1-%d are finished; starting from %s", first, init_from)

    set_seed(options.seed)
    processor, model = build_model_and_processor(config, init_from=init_from)
    data = None
    summaries = _previous_summaries(stage_dirs[:first])
    started = time.time()
    for index in range(first, len(config.stages)):
        stage = config.stages[index]
        if data is None:
            data = _Data(
                _load_source(train_data if train_data is not None else config.data.train_manifest, config.data,
                             config.data.on_error, processor.sampling_rate),
                _load_eval(config, eval_data, processor.sampling_rate),
            )  # fmt: skip
        last_stage = index == len(config.stages) - 1
        final_dir = output_dir if last_stage else stage_dirs[index] / "final"
        checkpoint = None
        if resume:
            checkpoint = resume if isinstance(resume, str) and index == first else _last_checkpoint(stage_dirs[index])
            if checkpoint is not None and (problem := checkpoint_problem(checkpoint)):
                raise CheckpointError(f"cannot resume from {checkpoint}: {problem}")
        summaries.append(
            _run_stage(config, stage, index, model, processor, data, stage_dirs[index], final_dir, checkpoint,
                       callbacks)
        )  # fmt: skip
    if _is_main_process():
        _write_outputs(config, output_dir, summaries, time.time() - started)
    _barrier()
    return output_dir


def _load_eval(config: TrainConfig, eval_data: Any, sampling_rate: int):
    source = eval_data if eval_data is not None else config.data.eval_manifest
    if source is None:
        return None
    manifest = _load_source(source, config.data, config.data.on_error, sampling_rate)
    return manifest.select(config.data.max_eval_samples)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (incomplete or truncated files), with what is wrong."""


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")  # fmt: skip


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What makes `folder` unusable for resuming, or None when it is complete.

    `Trainer` writes `trainer_state.json` after the weights, optimizer, scheduler and RNG states, so a save killed
    midway lacks it or leaves a truncated file; each file is checked cheaply (a safetensors header against the
    file size, a torch zip's central directory, which sits at its end, JSON parsing) without loading any tensor.
    """
    import zipfile

    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json (the save did not finish)"
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return "no model weights"
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with open(path, "rb") as handle:
                    size = int.from_bytes(handle.read(8), "little")
                    header = json.loads(handle.read(size))
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
                if path.stat().st_size < 8 + size + max(ends, default=0):
                    return f"{path.name} is truncated"
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:  # torch.save's format; the index is written last
                    archive.infolist()
        except (ValueError, KeyError, TypeError, IndexError, OSError, zipfile.BadZipFile) as error:
            return f"{path.name} is truncated or corrupt ({type(error).__name__})"
    return None


def _last_checkpoint(stage_dir: Path) -> str | None:
    """The newest complete `checkpoint-N` of a stage; incomplete ones (a save killed midway) are skipped, loudly."""
    if not stage_dir.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in stage_dir.iterdir()
             if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name))]  # fmt: skip
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("skipping incomplete checkpoint %s: %s; trying the one before", path, problem)
    if found:
        logger.warning("no complete checkpoint in %s; the stage starts again from its beginning", stage_dir)
    return None


def _eval_datasets(records, sampling_rate: int, task_prompts: dict[str, str], cache):
    """One eval set, or one per task when the eval data mixes tasks: `Trainer` then reports `eval_<task>_loss`
    (and `SpeechLMTrainer.evaluate` a pooled `eval_loss`)."""
    from .data import SpeechLMDataset
    from .tasks import group_by_task

    if records is None:
        return None
    groups = group_by_task(records)
    if len(groups) == 1:
        return SpeechLMDataset(records, sampling_rate, task_prompts, encoder_cache=cache)
    return {name: SpeechLMDataset([records[i] for i in indices], sampling_rate, task_prompts, encoder_cache=cache)
            for name, indices in groups.items()}  # fmt: skip


def _previous_summaries(stage_dirs: list[Path]) -> list[dict]:
    summaries = []
    for stage_dir in stage_dirs:
        with open(stage_dir / STAGE_DONE_NAME, encoding="utf-8") as handle:
            summaries.append(json.load(handle))
    return summaries


def _run_stage(config: TrainConfig, stage: StageConfig, index: int, model, processor, data: _Data,
               stage_dir: Path, final_dir: Path, checkpoint: str | None, callbacks: list | None) -> dict:
    from .data import EncoderCache, SpeechLMCollator, SpeechLMDataset

    options = dataclasses.replace(config.training, **{k: copy.deepcopy(v) for k, v in stage.training.items()})
    apply_stage(model, stage)
    trainable, total = count_parameters(model)
    args = make_training_arguments(options, stage_dir, has_eval=data.eval is not None,
                                   find_unused=stage.train_encoder or stage.train_decoder)
    is_main = args.process_index == 0
    if is_main:
        logger.info("stage %d (%s): %s of %s parameters trainable", index + 1, stage.name, f"{trainable:,}",
                    f"{total:,}")
    cache = None
    if config.data.encoder_cache and not stage.train_encoder:
        storage = config.data.encoder_cache
        model.to(args.device)
        cache = EncoderCache.for_model(model, processor, storage, config.data.encoder_cache_dir)
    task_prompts = config.data.task_prompts
    train_set = SpeechLMDataset(data.train, processor.sampling_rate, task_prompts, encoder_cache=cache)
    eval_set = _eval_datasets(data.eval, processor.sampling_rate, task_prompts, cache)
    if cache is not None:
        eval_sets = list(eval_set.values()) if isinstance(eval_set, dict) else [eval_set]
        for dataset in filter(None, (train_set, *eval_sets)):
            cache.fill(model, processor, dataset, batch_size=options.per_device_eval_batch_size,
                       rank=args.process_index, world_size=args.world_size, progress=is_main)
        _barrier()
    if not getattr(model, "_no_split_modules", None):
        # accelerate's TRANSFORMER_BASED_WRAP (FSDP) reads this: shard each encoder and decoder layer.
        model._no_split_modules = fsdp_layer_classes(model)
    trainer = SpeechLMTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=SpeechLMCollator(processor, encoder_cache=cache), processing_class=processor,
        callbacks=list(callbacks or []), wer_records=list(data.eval) if data.eval is not None else None,
        evaluation=config.evaluation, task_prompts=task_prompts,
    )  # fmt: skip
    started = time.time()
    if checkpoint and is_main:
        logger.info("resuming stage %s from %s", stage.name, checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    elapsed = time.time() - started
    trainer.save_model(str(final_dir))
    # FSDP shards the parameters, so no process holds the whole weights to hash.
    weights_hash = None if trainer.is_fsdp_enabled else trainable_weights_sha256(model)
    hashes = [weights_hash]
    if args.world_size > 1 and weights_hash is not None:
        from accelerate.utils import gather_object

        hashes = gather_object([weights_hash])
        (stage_dir / f"weights_sha256.rank{args.process_index}.txt").write_text(weights_hash + "\n")
    summary = {
        "stage": stage.name,
        "index": index,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "elapsed_seconds": elapsed,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "learning_rate": options.learning_rate,
        "world_size": args.world_size,
        "trainable_weights_sha256": weights_hash,
        "ranks_agree": len(set(hashes)) == 1,
        "encoder_cache": config.data.encoder_cache if cache is not None else None,
        "final": str(final_dir),
        "log_history": trainer.state.log_history,
    }
    if len(set(hashes)) != 1:
        logger.error("stage %s: the ranks ended with different weights: %s", stage.name, hashes)
    if is_main:
        with open(stage_dir / STAGE_DONE_NAME, "w", encoding="utf-8") as handle:
            json.dump(_finite(summary), handle, indent=2)
    _barrier()
    return summary


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------- outputs
# Trainer's names for the per-task eval losses of a dict of eval sets, and the timing keys the report leaves out.
_TASK_LOSS = re.compile(r"eval_(.+)_loss")
_TIMING = re.compile(r"eval_.*(runtime|per_second|model_preparation_time)")


def _curves(summaries: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Loss/WER points on one step axis across stages (each stage's steps continue the previous stage's)."""
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": [], "eval_wer": [], "eval_cer": []}
    offset = 0
    for summary in summaries:
        for entry in summary["log_history"]:
            for key in [*curves, *(k for k in entry if _TASK_LOSS.fullmatch(k) and k not in curves)]:
                if entry.get(key) is not None and "step" in entry:
                    curves.setdefault(key, []).append((offset + entry["step"], float(entry[key])))
        offset += summary["global_step"]
    return curves


def plot_training_curves(summaries: list[dict], path: Path) -> Path | None:
    """Training/eval loss and WER/CER against steps, with the stage boundaries marked; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no training_curves.png")
        return None
    curves = _curves(summaries)
    has_wer = bool(curves["eval_wer"])
    figure, axes = plt.subplots(1, 2 if has_wer else 1, figsize=(11 if has_wer else 6, 4), squeeze=False)
    loss_axis = axes[0][0]
    task_losses = [(key, f"eval loss ({_TASK_LOSS.fullmatch(key).group(1)})", "o--") for key in curves
                   if key != "eval_loss" and _TASK_LOSS.fullmatch(key)]  # fmt: skip
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-"), *task_losses):
        if curves[key]:
            loss_axis.plot(*zip(*curves[key]), style, label=label, markersize=3)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.set_title("Loss")
    if has_wer:
        wer_axis = axes[0][1]
        for key, label in (("eval_wer", "WER"), ("eval_cer", "CER")):
            if curves[key]:
                steps, values = zip(*curves[key])
                wer_axis.plot(steps, [100 * v for v in values], "o-", label=label, markersize=3)
        wer_axis.set_xlabel("step")
        wer_axis.set_ylabel("%")
        wer_axis.set_title("Error rates (eval)")
    offset = 0
    for summary in summaries[:-1]:
        offset += summary["global_step"]
        for row in axes:
            for axis in row:
                axis.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
    for row in axes:
        for axis in row:
            if axis.get_legend_handles_labels()[0]:
                axis.legend()
            axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _write_outputs(config: TrainConfig, output_dir: Path, summaries: list[dict], elapsed: float) -> None:
    from .evaluation import format_summary_table

    image = plot_training_curves(summaries, output_dir / "training_curves.png")
    lines = [f"# Training report: {output_dir.name}", ""]
    source = config.model.init_from or f"{config.model.encoder} + {config.model.decoder}"
    lines += [f"- Model: {source} (audio layout {config.model.audio_layout})",
              f"- Train data: {config.data.train_manifest}", f"- Eval data: {config.data.eval_manifest}",
              f"- Wall time of this invocation: {elapsed / 60:.1f} min", ""]  # fmt: skip
    lines += ["| Stage | Steps | Learning rate | Trainable params | Final train loss | Time |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for s in summaries:
        loss = next((e["loss"] for e in reversed(s["log_history"]) if "loss" in e), None)
        lines.append(
            f"| {s['stage']} | {s['global_step']} | {s['learning_rate']:g} | {s['trainable_parameters']:,} | "
            f"{'n/a' if loss is None else f'{loss:.4f}'} | {s['elapsed_seconds'] / 60:.1f} min |"
        )
    lines.append("")
    final_metrics = {}  # the last value of every eval metric (per task too), without the timings
    for entry in (entry for summary in summaries for entry in summary["log_history"]):
        final_metrics.update({key.removeprefix("eval_"): value for key, value in entry.items()
                              if key.startswith("eval_") and not _TIMING.fullmatch(key) and value is not None})
    if final_metrics:
        lines.append(format_summary_table(final_metrics, "Final evaluation"))
    if image is not None:
        lines += [f"![training curves]({image.name})", ""]
    lines += ["Load it with:", "", "```python", "from speechlm.inference import load_pretrained",
              f"processor, model = load_pretrained({str(output_dir)!r})", "```", ""]  # fmt: skip
    if any(s["world_size"] > 1 for s in summaries):
        agree = all(s["ranks_agree"] for s in summaries)
        lines.append(f"Distributed: {summaries[-1]['world_size']} processes; final weights identical on every rank: "
                     f"{'yes' if agree else 'NO'}.")
    (output_dir / "training_report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"stages": [{k: v for k, v in s.items() if k != "log_history"} for s in summaries],
               "final_metrics": final_metrics, "global_step": summaries[-1]["global_step"]}
    with open(output_dir / SUMMARY_NAME, "w", encoding="utf-8") as handle:
        json.dump(_finite(summary), handle, indent=2)


# --------------------------------------------------------------------------------------------------------- merge-lora
def merge_lora_checkpoint(input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                          dtype: str | None = None) -> Path:
    """Load a SpeechLM folder with LoRA adapters, fold them into the decoder and save a plain model + processor."""
    from .modeling import SpeechLMModel
    from .processing import SpeechLMProcessor

    model = SpeechLMModel.from_pretrained(input_dir, **({"dtype": dtype} if dtype else {}))
    if not model.config.lora:
        raise ValueError(f"{input_dir} has no LoRA adapters to merge")
    model.merge_lora()
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    SpeechLMProcessor.from_pretrained(input_dir).save_pretrained(output_dir)
    return output_dir


def add_merge_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a trained SpeechLM folder whose decoder has LoRA adapters")
    parser.add_argument("output", help="where to write the merged model and its processor")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")


def run_merge_lora(args: argparse.Namespace) -> int:
    path = merge_lora_checkpoint(args.input, args.output, args.dtype)
    print(f"merged LoRA adapters into {path}")
    return 0


# --------------------------------------------------------------------------------------------------------------- CLI
_SECTIONS = (("model", ModelConfig), ("data", DataConfig), ("training", TrainingOptions),
             ("evaluation", EvaluationConfig))  # fmt: skip


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--resume`, one `--section.key VALUE` option per config field, and `--set KEY=VALUE` for nested
    keys (`--set stages.1.max_steps=50`). Values are YAML (`20`, `null`, `[a, b]`)."""
    parser.add_argument("--config", help="YAML training config (see speechlm/configs/train_example.yaml)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue the run in training.output_dir from its last checkpoint (or CHECKPOINT)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key by its dotted path, e.g. stages.0.max_steps=100")
    parser.add_argument("--stages", type=parse_value, default=argparse.SUPPRESS, dest="override:stages",
                        metavar="YAML", help="the whole stages list as YAML")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for section, kind in _SECTIONS:
        group = parser.add_argument_group(f"{section} options")
        for item in dataclasses.fields(kind):
            group.add_argument(f"--{section}.{item.name}", type=parse_value, default=argparse.SUPPRESS,
                               dest=f"override:{section}.{item.name}", metavar="VALUE")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {k.removeprefix("override:"): v for k, v in vars(args).items() if k.startswith("override:")}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = parse_value(value)
    return load_config(args.config, overrides)


def run_train(args: argparse.Namespace) -> int:
    import yaml

    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))
        return 0
    logging.basicConfig(level=logging.INFO if _is_main_process() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .data import ManifestError

    try:
        output_dir = train(config, resume=args.resume)
    except (FileExistsError, ManifestError, CheckpointError) as error:  # user errors: a message, not a traceback
        raise SystemExit(f"error: {error}") from None
    if _is_main_process():
        print(f"model, processor and report in {output_dir}")
    return 0


add_arguments = add_train_arguments
run = run_train

__all__ = [
    "CheckpointError",
    "DataConfig",
    "EvaluationConfig",
    "ModelConfig",
    "StageConfig",
    "TrainConfig",
    "SpeechLMTrainer",
    "TrainingOptions",
    "apply_stage",
    "build_model_and_processor",
    "checkpoint_problem",
    "load_config",
    "merge_lora_checkpoint",
    "train",
]

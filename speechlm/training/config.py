"""The training config: its schema (model, data, training, evaluation, stages), YAML loading and dotted overrides.

Kept free of torch so that `speechlm train --help` and `--print-config` stay fast.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Where the model comes from: a pretrained encoder + LLM pair, or `init_from` a SpeechLM folder.

    `projector_hidden_size` and `projector_dropout` carry `SpeechLMConfig`'s names (the old `projection_hidden_size`
    and `encoder_dropout` are still read, with a warning)."""

    encoder: str | None = None
    decoder: str | None = None
    init_from: str | None = None
    projector_hidden_size: int = 1024
    projector_dropout: float = 0.0
    projector_layers: int = 0
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
    # JSONL of text-only examples (`speechlm.data.read_text_examples`), drawn `training.text_rows` to a batch.
    text_examples: str | None = None


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
    # Weight of the KL to the text-only LLM reading the transcript (speechlm.training.distillation); one process only.
    distill_weight: float = 0.0
    distill_agreeing_only: bool = False  # the KL only on answer tokens whose label is the teacher's top token
    # Text-only rows added to every batch from data.text_examples, their loss weighted by text_weight.
    text_rows: int = 0
    text_weight: float = 1.0
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
    """What trains in one stage. `lora` adds adapters when the stage starts (once); other keys override `training`.

    `lora` takes peft's and `SpeechLMConfig.lora`'s names: `r`, `lora_alpha`, `lora_dropout`, `target_modules`;
    a key left out keeps `SpeechLMModel.add_lora`'s default (the one place defaults live)."""

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
        values = upgrade_keys(dict(values or {}))
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
        if self.training.text_rows < 0 or self.training.text_weight < 0:
            raise ValueError("training.text_rows and training.text_weight must be >= 0, got "
                             f"{self.training.text_rows} and {self.training.text_weight}")
        if self.training.text_rows and not self.data.text_examples:
            raise ValueError("training.text_rows needs data.text_examples: a JSONL file of text-only examples "
                             '({"transcript", "text", "prompt" or "task"} a line)')
        from ..tasks import parse_task_metrics

        parse_task_metrics([f"{task}={kind}" for task, kind in self.evaluation.task_metrics.items()])
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")


# Old spellings, still read so that existing YAML keeps working: one name per concept (SpeechLMConfig's and peft's).
RENAMED_MODEL_KEYS = {"projection_hidden_size": "projector_hidden_size", "encoder_dropout": "projector_dropout"}
RENAMED_LORA_KEYS = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def _renamed(values: dict, renames: dict[str, str], where: str) -> dict:
    """`values` with old keys under their new names (a FutureWarning each); both spellings at once are an error."""
    if not isinstance(values, dict) or not renames.keys() & values.keys():
        return values
    values = dict(values)
    for old, new in renames.items():
        if old in values:
            if new in values:
                raise ValueError(f"{where} sets both {old!r} and {new!r}: keep {new!r} only")
            warnings.warn(f"config key {where}.{old} is deprecated and will be removed: write {where}.{new} instead",
                          FutureWarning, stacklevel=2)  # fmt: skip
            values[new] = values.pop(old)
    return values


def upgrade_keys(values: dict[str, Any]) -> dict[str, Any]:
    """A raw config with every deprecated key renamed (model section and each stage's `lora`), warning once each."""
    values = dict(values)
    if isinstance(values.get("model"), dict):
        values["model"] = _renamed(values["model"], RENAMED_MODEL_KEYS, "model")
    if isinstance(values.get("stages"), list):
        values["stages"] = [
            {**raw, "lora": _renamed(raw["lora"], RENAMED_LORA_KEYS, f"stages.{index}.lora")}
            if isinstance(raw, dict) and isinstance(raw.get("lora"), dict) else raw
            for index, raw in enumerate(values["stages"])
        ]  # fmt: skip
    return values


def upgrade_path(dotted: str) -> str:
    """A dotted override key with a deprecated last part renamed (`model.encoder_dropout` -> `model.projector_dropout`),
    so that an override wins over the same setting written the other way in the YAML."""
    parts = dotted.split(".")
    if len(parts) == 2 and parts[0] == "model":
        renames, where = RENAMED_MODEL_KEYS, "model"
    elif len(parts) == 4 and parts[0] == "stages" and parts[2] == "lora":
        renames, where = RENAMED_LORA_KEYS, ".".join(parts[:3])
    else:
        return dotted
    new = next(iter(_renamed({parts[-1]: None}, renames, where)))
    return ".".join([*parts[:-1], new])


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
        _check_keys(stage.lora, {"r", "lora_alpha", "lora_dropout", "target_modules"}, f"stages[{index}].lora")
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
    values = upgrade_keys(values)  # before the overrides, so that one spelt the new way replaces an old YAML key
    for key, value in (overrides or {}).items():
        set_by_path(values, upgrade_path(key), value)
    return TrainConfig.from_dict(values)

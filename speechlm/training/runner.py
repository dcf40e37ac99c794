"""One training run: the data loaded once, then every stage a `Trainer` run of its own, resumable stage by stage.

A stage starts from the previous stage's final weights and marks itself done with `stage_done.json`; the last stage
writes the model and its processor to the output folder itself, then the report is written beside them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from ..evaluation import json_safe
from .checkpoints import CheckpointError, checkpoint_problem, last_checkpoint
from .config import DataConfig, StageConfig, TrainConfig
from .distributed import barrier, fsdp_layer_classes, is_main_process, trainable_weights_sha256
from .report import write_report
from .stages import apply_stage, build_model_and_processor, count_parameters
from .trainer import SpeechLMTrainer, make_training_arguments

logger = logging.getLogger(__name__)

STAGE_DONE_NAME = "stage_done.json"


@dataclass
class _Data:
    train: Any
    eval: Any


def _load_source(source: Any, data: DataConfig, on_error: str, sampling_rate: int | None):
    """A manifest path (or list of them), a `save_to_disk` folder, a Manifest, a datasets.Dataset or a list of dicts."""
    from ..data import Manifest, load_records, read_manifest, records_from_dataset

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
        if is_main_process():
            shutil.rmtree(output_dir / "stages")
        barrier()
    output_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
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
            checkpoint = resume if isinstance(resume, str) and index == first else last_checkpoint(stage_dirs[index])
            if checkpoint is not None and (problem := checkpoint_problem(checkpoint)):
                raise CheckpointError(f"cannot resume from {checkpoint}: {problem}")
        summaries.append(
            _run_stage(config, stage, index, model, processor, data, stage_dirs[index], final_dir, checkpoint,
                       callbacks)
        )  # fmt: skip
    if is_main_process():
        write_report(config, output_dir, summaries, time.time() - started)
    barrier()
    return output_dir


def _load_eval(config: TrainConfig, eval_data: Any, sampling_rate: int):
    source = eval_data if eval_data is not None else config.data.eval_manifest
    if source is None:
        return None
    manifest = _load_source(source, config.data, config.data.on_error, sampling_rate)
    return manifest.select(config.data.max_eval_samples)


def _eval_datasets(records, sampling_rate: int, task_prompts: dict[str, str], cache):
    """One eval set, or one per task when the eval data mixes tasks: `Trainer` then reports `eval_<task>_loss`
    (and `SpeechLMTrainer.evaluate` a pooled `eval_loss`)."""
    from ..data import SpeechLMDataset
    from ..tasks import group_by_task

    if records is None:
        return None
    groups = group_by_task(records)
    if len(groups) == 1:
        return SpeechLMDataset(records, sampling_rate, task_prompts, encoder_cache=cache)
    return {name: SpeechLMDataset([records[i] for i in indices], sampling_rate, task_prompts, encoder_cache=cache)
            for name, indices in groups.items()}  # fmt: skip


def _text_rows(config: TrainConfig, options, task_prompts: dict[str, str], rank: int) -> dict:
    """The collator's text-only rows for a stage (`training.text_rows` from `data.text_examples`), each process
    drawing its own order."""
    if not options.text_rows:
        return {}
    if not config.data.text_examples:
        raise ValueError("training.text_rows needs data.text_examples: a JSONL file of text-only examples")
    from ..data import read_text_examples

    examples = read_text_examples(config.data.text_examples, task_prompts, config.data.on_error)
    return {"text_examples": examples, "text_rows": options.text_rows, "seed": options.seed + rank}


def _previous_summaries(stage_dirs: list[Path]) -> list[dict]:
    summaries = []
    for stage_dir in stage_dirs:
        with open(stage_dir / STAGE_DONE_NAME, encoding="utf-8") as handle:
            summaries.append(json.load(handle))
    return summaries


def _run_stage(config: TrainConfig, stage: StageConfig, index: int, model, processor, data: _Data,
               stage_dir: Path, final_dir: Path, checkpoint: str | None, callbacks: list | None) -> dict:
    from ..data import EncoderCache, SpeechLMCollator, SpeechLMDataset

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
        barrier()
    if not getattr(model, "_no_split_modules", None):
        # accelerate's TRANSFORMER_BASED_WRAP (FSDP) reads this: shard each encoder and decoder layer.
        model._no_split_modules = fsdp_layer_classes(model)
    collator = SpeechLMCollator(processor, encoder_cache=cache, distillation=options.distill_weight > 0,
                                **_text_rows(config, options, task_prompts, args.process_index))
    trainer = SpeechLMTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
        processing_class=processor, distill_weight=options.distill_weight,
        distill_agreeing_only=options.distill_agreeing_only, text_weight=options.text_weight,
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
            json.dump(json_safe(summary), handle, indent=2)
    barrier()
    return summary



"""Worker for tests/test_distributed.py: a few AdamW steps of a tiny SpeechLM, single process or several (torchrun).

    python tests/distributed_worker.py ENCODER DECODER OUT [--fsdp] [--lora] [--steps N] [--checkpointing]
    python tests/distributed_worker.py ENCODER DECODER OUT --trainer {single,ddp,zero2,zero3} [...]

Every process builds the same model (same seed): frozen encoder, frozen LLM (with --lora: LoRA adapters on it; else
its head trains), trainable projector. The global batch is always the same 4 clips.

Without --trainer, a plain loop: each process takes its share of the batch and scales its summed token loss by
world_size / global token count, so FSDP2's (`--fsdp`) gradient average equals the single process's gradient.
With --trainer, transformers' `Trainer` runs the steps: `single` in one process (4 clips a step), `ddp` (gloo) and
DeepSpeed ZeRO-2 / ZeRO-3 (`TrainingArguments(deepspeed=...)`) under torchrun with 2 clips per process; the Trainer
divides by the token count of the whole global batch (num_items_in_batch) itself.
--checkpointing turns gradient checkpointing on (non-reentrant).

Writes OUT/summary.json (the global loss per step, ...), OUT/trained.pt (the trainable weights, gathered from the
shards) and, distributed, a trainable-only checkpoint written from the shards (OUT/trainable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from speechlm.training.distributed import end_distributed, exit_rank, is_distributed_launch

TEXTS = ["call mom tomorrow morning", "play some jazz music", "remind me to buy milk", "set an alarm"]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def build(encoder: str, decoder: str, lora: bool, initialise: bool = True):
    """The same model in every process: frozen encoder and LLM, trainable projector (+ LoRA, else the LM head)."""
    from speechlm import create_speech_lm_model

    torch.manual_seed(0)
    feature_extractor, tokenizer, model = create_speech_lm_model(encoder, decoder, projection_hidden_size=32)
    if initialise:
        torch.manual_seed(1)
        for param in [*model.multi_modal_projector.parameters(), model.audio_start, model.audio_end]:
            param.data.normal_(0, 0.2)
    model.freeze_encoder()
    model.freeze_decoder()
    if lora:
        model.add_lora(**LORA)
        if initialise:
            torch.manual_seed(2)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.data.normal_(0, 0.1)
    else:
        model.freeze_decoder_except_lm_head()  # a frozen body with a trainable head: mixed inside one unit
    return feature_extractor, tokenizer, model


def checkpointed_layers(model) -> dict[str, int]:
    """How many encoder and decoder layers recompute their activations in the backward pass."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return {side: sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in part.modules())
            for side, part in (("encoder", model.audio_tower), ("decoder", model.language_model))}


def clips():
    from tests.conftest import make_clips

    return make_clips((0.5, 0.7, 0.4, 0.9), seed=3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("encoder")
    parser.add_argument("decoder")
    parser.add_argument("out")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--trainer", choices=["single", "ddp", "zero2", "zero3"])
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.trainer:
        run_trainer(args)
    else:
        run_loop(args)
    if is_distributed_launch():
        exit_rank(0)  # as `speechlm train` ends a rank: interpreter teardown can abort one whose work is done


def run_loop(args) -> None:
    from speechlm import SpeechLMProcessor
    from speechlm.configuration import IGNORE_INDEX
    from speechlm.training import apply_fully_shard, fsdp_layer_classes, full_state_dict

    distributed = args.fsdp
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1

    feature_extractor, tokenizer, model = build(args.encoder, args.decoder, args.lora)
    if args.checkpointing:  # transformers 5 renamed gradient_checkpointing_enable (still there, deprecated)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    model.train()
    processor = SpeechLMProcessor(feature_extractor, tokenizer, prompt="transcribe")
    batch = processor(clips(), text=TEXTS)
    total_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the LLM shifts labels by one
    share = {k: v[rank::world] for k, v in batch.items()}  # extra padding columns are dropped by the merge

    layer_classes = fsdp_layer_classes(model)
    if distributed:
        apply_fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-3, weight_decay=0.0)
    losses = []
    for _ in range(args.steps):
        out = model(**share)
        tokens = int((share["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = out.loss * tokens / total_tokens * world  # FSDP averages gradients over the ranks
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        reported = out.loss.detach() * tokens / total_tokens
        if distributed:
            torch.distributed.all_reduce(reported)
        losses.append(float(reported))

    out_dir = Path(args.out)
    state = full_state_dict(model) if distributed else model.state_dict()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        trained = {n: state[n].detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(trained, out_dir / "trained.pt")
        summary = {"losses": losses, "world_size": world, "layer_classes": layer_classes,
                   "trainable": sorted(trained), "checkpointing": model.is_gradient_checkpointing,
                   "checkpointed_layers": checkpointed_layers(model)}
        if distributed:
            from torch.distributed.tensor import DTensor

            summary["sharded"] = sum(isinstance(p, DTensor) for p in model.parameters())
            summary["parameters"] = sum(1 for _ in model.parameters())
            # A trainable-only checkpoint from the gathered weights, written by one unsharded copy.
            _, _, plain = build(args.encoder, args.decoder, args.lora, initialise=False)
            plain.load_state_dict(state)
            plain.save_pretrained(out_dir / "trainable", trainable_only=True)
        (out_dir / "summary.json").write_text(json.dumps(summary))
    if distributed:
        end_distributed()


class ClipDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.items = list(zip(clips(), TEXTS))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def run_trainer(args) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from speechlm import SpeechLMProcessor
    from speechlm.training.distributed import (
        deepspeed_config,
        gathered_parameters,
        is_zero3_partitioned,
        save_trainable_only,
    )

    distributed = args.trainer != "single"
    if args.trainer.startswith("zero"):
        import importlib

        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (g++, ~1 minute, under a file lock
        # in ~/.cache/torch_extensions that a killed build leaves behind) when it starts; gloo works without it.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out_dir = Path(args.out)
    # The model first, then the arguments: with ZeRO-3, DeepSpeed partitions the built model when the Trainer starts.
    feature_extractor, tokenizer, model = build(args.encoder, args.decoder, args.lora)
    processor = SpeechLMProcessor(feature_extractor, tokenizer, prompt="transcribe")
    options = dict(
        output_dir=str(out_dir / "run"), max_steps=args.steps, per_device_train_batch_size=4 // world,
        learning_rate=5e-3, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        save_strategy="no", report_to=[], remove_unused_columns=False, label_names=["labels"], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    if args.checkpointing:  # the name `speechlm train` uses (make_training_arguments): whichever this version has
        fields = {field.name for field in dataclasses.fields(TrainingArguments)}
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        options.update({name: True, f"{name}_kwargs": {"use_reentrant": False}})
    if distributed:
        options["ddp_backend"] = "gloo"
    if args.trainer.startswith("zero"):
        options["deepspeed"] = deepspeed_config(int(args.trainer[-1]))
    training_args = TrainingArguments(**options)

    def collate(items):
        return dict(processor([clip for clip, _ in items], text=[text for _, text in items]))

    seen = {}

    class Watch(TrainerCallback):
        def on_train_begin(self, _args, state, control, model=None, **kwargs):
            seen["partitioned"] = is_zero3_partitioned(model.parameters())
            seen["checkpointing"] = model.is_gradient_checkpointing
            seen["checkpointed_layers"] = checkpointed_layers(model)

    trainer = Trainer(model=model, args=training_args, train_dataset=ClipDataset(), data_collator=collate,
                      callbacks=[Watch()])  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    rank = training_args.process_index

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered_parameters([p for _, p in trainable]):
        trained = {n: p.detach().float().cpu().clone() for n, p in trainable}
    summary = {"losses": losses, "world_size": training_args.world_size, "trainable": sorted(trained),
               "deepspeed": trainer.is_deepspeed_enabled, **seen}
    if distributed:
        save_trainable_only(model, out_dir / "trainable")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(trained, out_dir / "trained.pt")
        (out_dir / "summary.json").write_text(json.dumps(summary))
    if distributed:
        end_distributed()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""Several processes: FSDP2 sharding helpers, DeepSpeed ZeRO configs and the ZeRO-3 gather, the weight hash that tells
whether DDP ranks stayed in sync, and the rank-0 / barrier primitives the run uses. Nothing here replaces what
transformers' `Trainer`, accelerate and DeepSpeed drive."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import sys
from typing import NoReturn

import torch


def trainable_weights_sha256(model) -> str:
    """Hash of the trainable weights: equal on every DDP rank when the replicas stayed in sync. Under DeepSpeed
    ZeRO-3 every rank must call it (the trainable weights are gathered from their partitions first)."""
    digest = hashlib.sha256()
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    with gathered_parameters([param for _, param in trainable]):
        for name, param in trainable:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def deepspeed_config(stage: int = 2, **zero_options) -> dict:
    """A DeepSpeed config for `TrainingArguments(deepspeed=...)`: ZeRO `stage` (2: optimizer state and gradients
    partitioned; 3: the parameters too), everything the Trainer already knows left "auto" (batch sizes, gradient
    accumulation, clipping, bf16/fp16), and no "optimizer" section, so the Trainer's own AdamW over the trainable
    parameters is used (no DeepSpeed fused/CPU Adam op to compile). Under ZeRO-3 the 16-bit weights are gathered when
    the Trainer saves, so `trainer.save_model` writes a full checkpoint. `zero_options` update "zero_optimization"
    (e.g. `offload_optimizer={"device": "cpu"}`)."""
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, not {stage!r}")
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    zero.update(zero_options)
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def is_zero3_partitioned(parameters) -> bool:
    """Whether any of these parameters is a DeepSpeed ZeRO-3 partition (its data lives spread over the ranks)."""
    return any(hasattr(param, "ds_id") for param in parameters)


@contextlib.contextmanager
def gathered_parameters(parameters, modifier_rank: int | None = None):
    """Inside the block, ZeRO-3-partitioned `parameters` (a model or an iterable of them) hold their full data on
    every rank (DeepSpeed's `zero.GatheredParameters`; every rank must enter it); with `modifier_rank`, what that rank
    writes into them is partitioned again on exit. A no-op for plain, DDP, ZeRO-1/2 or FSDP parameters."""
    parameters = list(parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters)
    if not is_zero3_partitioned(parameters):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank):
        yield


def save_trainable_only(model, save_directory) -> None:
    """`model.save_pretrained(save_directory, trainable_only=True)` from any process layout: under ZeRO-3 the weights
    are gathered first (every rank must call this); rank 0 writes. `SpeechLMModel.from_pretrained` reloads it."""
    with gathered_parameters(model):
        if is_main_process():
            model.save_pretrained(save_directory, trainable_only=True)
    barrier()


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


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes shared files and reports."""
    return int(os.environ.get("RANK", "0")) == 0


def end_distributed(*, completed: bool = True) -> None:
    """Tear the process group down before the process exits. After a `completed` run the ranks first meet at a
    barrier, so no rank closes its connections while another still talks over them; after a failure they do not (the
    others may never arrive)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if completed:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_rank(code: int = 0) -> NoReturn:
    """End a distributed rank without the interpreter's teardown: Python's exit handlers run (loggers flush), the
    streams are flushed, then the process leaves with `code`. Torch's C++ teardown at interpreter exit sometimes
    aborted a rank whose work was done and saved ("terminate called without an active exception", SIGABRT), about one
    CI run in three under torchrun, which then reports the whole job as failed."""
    atexit._run_exitfuncs()  # what a normal exit would run first: e.g. experiment trackers finishing their upload
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_distributed_launch() -> bool:
    """Whether this process is one of several ranks started by torchrun / accelerate (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def barrier() -> None:
    """Wait for every process when running distributed; a no-op in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()

"""Worker for tests/test_distributed.py: a few AdamW steps of a tiny SpeechLM, single process or FSDP2 (torchrun).

    python tests/distributed_worker.py ENCODER DECODER OUT [--fsdp] [--lora] [--steps N]

Every process builds the same model (same seed), takes its share of one fixed global batch of 4 clips, and scales
its summed token loss by world_size / global token count, so FSDP's gradient average equals the single process's
gradient on the whole batch. Writes OUT/losses.json (the global loss per step) and, with --fsdp, a trainable-only
checkpoint gathered from the shards (OUT/trainable) plus the gathered trainable weights (OUT/trained.pt).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("encoder")
    parser.add_argument("decoder")
    parser.add_argument("out")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from speechlm import SpeechLMProcessor, create_speech_lm_model
    from speechlm.configuration import IGNORE_INDEX
    from speechlm.training import apply_fully_shard, fsdp_layer_classes, full_state_dict
    from tests.conftest import make_clips

    distributed = args.fsdp
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1

    torch.manual_seed(0)
    feature_extractor, tokenizer, model = create_speech_lm_model(args.encoder, args.decoder,
                                                                 projection_hidden_size=32)
    torch.manual_seed(1)
    for param in [*model.multi_modal_projector.parameters(), model.audio_start, model.audio_end]:
        param.data.normal_(0, 0.2)
    model.freeze_encoder()
    model.freeze_decoder()
    if args.lora:
        model.add_lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
        torch.manual_seed(2)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)
    else:
        model.freeze_decoder_except_lm_head()  # a frozen body with a trainable head: mixed inside one unit
    model.train()
    processor = SpeechLMProcessor(feature_extractor, tokenizer, prompt="transcribe")
    texts = ["call mom tomorrow morning", "play some jazz music", "remind me to buy milk", "set an alarm"]
    batch = processor(make_clips((0.5, 0.7, 0.4, 0.9), seed=3), text=texts)
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
                   "trainable": sorted(trained)}
        if distributed:
            from torch.distributed.tensor import DTensor

            summary["sharded"] = sum(isinstance(p, DTensor) for p in model.parameters())
            summary["parameters"] = sum(1 for _ in model.parameters())
            # A trainable-only checkpoint from the gathered weights, written by one unsharded copy.
            torch.manual_seed(0)
            _, _, plain = create_speech_lm_model(args.encoder, args.decoder, projection_hidden_size=32)
            plain.freeze_encoder()
            plain.freeze_decoder()
            if args.lora:
                plain.add_lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
            else:
                plain.freeze_decoder_except_lm_head()
            plain.load_state_dict(state)
            plain.save_pretrained(out_dir / "trainable", trainable_only=True)
        (out_dir / "summary.json").write_text(json.dumps(summary))
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

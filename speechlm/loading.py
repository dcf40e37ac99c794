"""The model-loading options shared by `transcribe`, `evaluate` and `serve`, kept free of torch imports so that
`speechlm CMD --help` stays instant."""

from __future__ import annotations

import argparse

QUANTIZE_CHOICES = ("none", "int8")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype and --quantize."""
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                        help="weights dtype; auto = bfloat16 where the CPU does it natively, else float32 "
                             "(default: the checkpoint's)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="int8: dynamic int8 quantisation of the LLM's linear layers (CPU only; fewer bytes "
                             "read per generated token)")


__all__ = ["DTYPE_CHOICES", "QUANTIZE_CHOICES", "add_loading_arguments"]

"""A GGUF LLM as a transformers causal LM, de-quantised once and then read back from safetensors.

transformers de-quantises every GGUF tensor with numpy and rebuilds the tokenizer from the GGUF vocabulary on each
load (SmolLM2-135M Q4_1: ~14 CPU-seconds for the weights, ~3 for the tokenizer here). The first load writes the
result as a plain transformers folder in the conversion cache (`speechlm.converters.cached`); later loads of the
same file (same path, size, mtime and dtype) read that folder instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from .cached import cache_enabled, cached_conversion, source_fingerprint

# Loading options that only concern where a hub file comes from: meaningless for the cached local folder.
_SOURCE_ONLY_KEYS = ("gguf_file", "revision", "cache_dir", "token", "local_files_only", "subfolder")

__all__ = ["cached_gguf_folder", "local_gguf_path"]


def local_gguf_path(name_or_path: str | os.PathLike, gguf_file: str) -> Path | None:
    """The GGUF file on disk (`name_or_path/gguf_file`, or `gguf_file` itself), or None for a hub id."""
    for candidate in (Path(name_or_path) / gguf_file, Path(gguf_file)):
        if candidate.is_file():
            return candidate
    return None


def _dequantized() -> dict:
    """Ask for plain tensors, since they are what we save. Unasked, transformers 5.x warns at every bfloat16
    conversion that packed weights are "fastest in float32", even when, as here, it goes on to de-quantise them all."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers without packed GGUF weights: they are always de-quantised
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def cached_gguf_folder(name_or_path: str | os.PathLike, loading_kwargs: dict) -> tuple[Path, dict] | None:
    """(cached transformers folder, loading kwargs for it) for a local GGUF decoder, or None to load it as usual.

    The conversion keeps only the dtype; every other option (attn_implementation, ...) applies to the reload, so
    one cache entry serves them all.
    """
    gguf_file = loading_kwargs.get("gguf_file")
    if not gguf_file or not cache_enabled():
        return None
    source = local_gguf_path(name_or_path, gguf_file)
    if source is None:
        return None
    dtype = loading_kwargs.get("dtype")
    fingerprint = source_fingerprint("gguf-causal-lm", [source], dtype)

    def convert(target: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(source.parent), source.name
        trust = {k: v for k, v in loading_kwargs.items() if k == "trust_remote_code"}
        options = {**trust, **({"dtype": dtype} if dtype is not None else {}), **_dequantized()}
        AutoTokenizer.from_pretrained(folder, gguf_file=name, **trust).save_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **options)
        # Older transformers de-quantise without being asked, and leave a GGUF "quantizer" that blocks saving.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(target)

    folder = cached_conversion(fingerprint, convert)
    return folder, {k: v for k, v in loading_kwargs.items() if k not in _SOURCE_ONLY_KEYS}

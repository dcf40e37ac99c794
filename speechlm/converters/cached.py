"""Converted base weights kept as safetensors, so a trained folder loads in seconds instead of re-converting.

A trainable-only checkpoint records its base models' paths. Rebuilding them used to re-read the CTranslate2 Whisper
file and de-quantise the GGUF LLM (plus convert its tokenizer) on every `from_pretrained`: tens of CPU-seconds on 2
cores, minutes on a busy machine. Each conversion is now written once under `cache_dir("converted", kind, key)`,
where `key` hashes the source's fingerprint (resolved path, size, mtime, dtype, format version), and every later
load reads the safetensors. A changed, moved or touched source gets a new key, so a stale cache is never read.
`SPEECHLM_CONVERSION_CACHE=0` turns the cache off (every load converts again).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..cache import cache_dir

# Bump when what is written changes, so older cache entries are ignored.
CACHE_FORMAT = 1
MARKER_FILE = "speechlm_conversion.json"
DISABLE_ENV = "SPEECHLM_CONVERSION_CACHE"

__all__ = ["cache_enabled", "cached_conversion", "source_fingerprint"]


def cache_enabled() -> bool:
    """False when `SPEECHLM_CONVERSION_CACHE` is 0/false/no/off."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def source_fingerprint(kind: str, files: Iterable[str | os.PathLike], dtype, **extra) -> dict:
    """What identifies one conversion: the kind, each source file's resolved path, size and mtime, and the dtype."""
    import transformers

    fingerprint = {"format": CACHE_FORMAT, "kind": kind, "dtype": _dtype_name(dtype),
                   "transformers": transformers.__version__, "files": []}
    for file in files:
        path = Path(file).resolve()
        stat = path.stat()
        fingerprint["files"].append([str(path), stat.st_size, stat.st_mtime_ns])
    fingerprint.update(extra)
    return fingerprint


def cached_conversion(fingerprint: dict, convert: Callable[[Path], None]) -> Path:
    """The cache folder for `fingerprint`, filled by `convert(folder)` the first time.

    `convert` writes into a private temporary folder that is renamed into place with the marker written last, so an
    interrupted conversion or two processes converting at once never leave a half-written entry behind.
    """
    key = hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:20]
    folder = cache_dir("converted", fingerprint["kind"]) / key
    if _is_complete(folder, fingerprint):
        return folder
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    try:
        convert(staging)
        (staging / MARKER_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
        if folder.exists():  # an incomplete or outdated entry
            shutil.rmtree(folder, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:  # another process won the race: its entry is as good as ours
            if not _is_complete(folder, fingerprint):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _is_complete(folder: Path, fingerprint: dict) -> bool:
    try:
        return json.loads((folder / MARKER_FILE).read_text(encoding="utf-8")) == fingerprint
    except (OSError, ValueError):
        return False


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "default"
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype | str) else repr(dtype)

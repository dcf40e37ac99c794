"""Where generated data, converted weights and demo runs live: one git-ignored folder, never the repository."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$SPEECHLM_CACHE` (default `~/.cache/speechlm`) joined with `parts`, created on demand."""
    root = Path(os.environ.get("SPEECHLM_CACHE") or Path.home() / ".cache" / "speechlm")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Which checkpoint a run resumes from: complete ones only, and a named reason for any that is not."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (incomplete or truncated files), with what is wrong."""


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")  # fmt: skip


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What makes `folder` unusable for resuming, or None when it is complete.

    `Trainer` writes `trainer_state.json` after the weights, optimizer, scheduler and RNG states, so a save killed
    midway lacks it or leaves a truncated file; each file is checked cheaply (a safetensors header against the
    file size, a torch zip's central directory, which sits at its end, JSON parsing) without loading any tensor.
    """
    import zipfile

    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json (the save did not finish)"
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return "no model weights"
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with open(path, "rb") as handle:
                    size = int.from_bytes(handle.read(8), "little")
                    header = json.loads(handle.read(size))
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
                if path.stat().st_size < 8 + size + max(ends, default=0):
                    return f"{path.name} is truncated"
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:  # torch.save's format; the index is written last
                    archive.infolist()
        except (ValueError, KeyError, TypeError, IndexError, OSError, zipfile.BadZipFile) as error:
            return f"{path.name} is truncated or corrupt ({type(error).__name__})"
    return None


def last_checkpoint(stage_dir: Path) -> str | None:
    """The newest complete `checkpoint-N` of a stage; incomplete ones (a save killed midway) are skipped, loudly."""
    if not stage_dir.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in stage_dir.iterdir()
             if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name))]  # fmt: skip
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("skipping incomplete checkpoint %s: %s; trying the one before", path, problem)
    if found:
        logger.warning("no complete checkpoint in %s; the stage starts again from its beginning", stage_dir)
    return None


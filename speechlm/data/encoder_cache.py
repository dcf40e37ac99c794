"""The frozen-encoder cache: each clip's encoder frames stored once, fed back as `encoder_frames` every epoch.

With a frozen encoder (usually most of the compute of a projector/LoRA run) the frames of a clip never change, so
`EncoderCache.fill` encodes every clip once and `SpeechLMCollator` batches the cached frames instead of audio.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .dataset import SpeechLMDataset


def encoder_fingerprint(model, processor) -> str:
    """Identity of what produces encoder frames: encoder weights, dtype, encoder config, feature-extractor settings.

    Weights are hashed, not the model's name, so an encoder fine-tuned by an earlier stage never reuses stale frames.
    """
    digest = hashlib.sha256()
    digest.update(model.config.audio_config.to_json_string().encode())
    digest.update(processor.feature_extractor.to_json_string().encode())
    for name, tensor in sorted(model.audio_tower.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class EncoderCache:
    """Frozen-encoder frames per clip, in memory (`directory=None`) or as safetensors files under `directory`.

    Keys combine the encoder fingerprint with the clip's path, size and mtime (or a hash of its bytes/samples) and its
    `augment` spec, so an edited file or a different encoder is a cache miss, never a stale hit, and each augmented
    copy of a clip is cached apart. Frames are kept in the encoder's dtype, which makes a cached forward identical to
    an uncached one, unless `dtype` says otherwise (float16 halves the memory of a large in-memory cache; the
    projector reads the rounded frames). An in-memory cache can be kept as one file between runs (`save`, `load`).
    """

    def __init__(self, fingerprint: str, directory: str | os.PathLike | None = None, dtype: torch.dtype | None = None):
        self.fingerprint = fingerprint
        self.directory = Path(directory) / fingerprint[:16] if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self._memory: dict[str, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model, processor, storage: str = "memory", directory: str | os.PathLike | None = None,
                  dtype: torch.dtype | None = None):
        """`storage="memory"` or `"disk"` (under `directory`, default `speechlm.cache.cache_dir("encoder_frames")`)."""
        if storage not in ("memory", "disk"):
            raise ValueError(f"encoder cache storage must be 'memory' or 'disk', got {storage!r}")
        if any(p.requires_grad for p in model.audio_tower.parameters()):
            raise ValueError("the encoder is being trained: its outputs change every step and cannot be cached")
        if storage == "disk" and directory is None:
            from ..cache import cache_dir

            directory = cache_dir("encoder_frames")
        return cls(encoder_fingerprint(model, processor), directory if storage == "disk" else None, dtype)

    def key(self, record: Mapping[str, Any]) -> str:
        audio = record["audio"]
        digest = hashlib.sha256(self.fingerprint.encode())
        if isinstance(audio, str):
            stat = os.stat(audio)
            digest.update(f"path:{os.path.abspath(audio)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        elif isinstance(audio, bytes):
            digest.update(b"bytes:" + audio)
        else:
            digest.update(f"array:{record.get('sampling_rate')}:".encode() + np.ascontiguousarray(audio).tobytes())
        if record.get("augment"):  # an augmented copy is another clip; the clean clip's key stays what it was
            digest.update(f"augment:{record['augment']}".encode())
        return digest.hexdigest()[:40]

    def _file(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return key in self._memory or (self.directory is not None and self._file(key).is_file())

    def __len__(self) -> int:
        if self.directory is None:
            return len(self._memory)
        return sum(1 for _ in self.directory.glob("*.safetensors"))

    def get(self, key: str) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        if self.directory is None or not self._file(key).is_file():
            raise KeyError(f"clip {key} is not in the encoder cache")
        from safetensors.torch import load_file

        return load_file(self._file(key))["frames"]

    def put(self, key: str, frames: torch.Tensor) -> None:
        # A copy, not a view: a slice of the padded batch would keep the whole batch alive (and shares its storage).
        frames = frames.detach().to("cpu", self.dtype or frames.dtype).clone(memory_format=torch.contiguous_format)
        if self.directory is None:
            self._memory[key] = frames
            return
        _save_atomically({"frames": frames}, self._file(key))

    def save(self, path: str | os.PathLike, keys: Iterable[str] | None = None) -> None:
        """The in-memory frames (only `keys`, when given) as one safetensors file, written atomically."""
        keys = self._memory if keys is None else keys
        _save_atomically({key: self._memory[key] for key in keys}, Path(path), {"fingerprint": self.fingerprint})

    def load(self, path: str | os.PathLike) -> int:
        """Add the frames `save` wrote to `path`, if it was written for this encoder; returns how many."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("fingerprint") != self.fingerprint:
                return 0
        frames = load_file(str(path))
        self._memory.update(frames)
        return len(frames)

    @torch.no_grad()
    def fill(self, model, processor, dataset: SpeechLMDataset, batch_size: int = 8, rank: int = 0,
             world_size: int = 1, progress: bool = True) -> int:
        """Encode every clip of `dataset` not cached yet (this rank's share with a disk cache); returns the count.

        Clips are encoded in length-sorted batches; the encoder runs in eval mode as a frozen encoder does in training.
        """
        from tqdm.auto import tqdm

        # With a disk cache the processes split the clips by index (not by what is missing at the moment they look,
        # which differs between processes while others write), then wait for each other before training.
        share = range(rank, len(dataset), world_size) if self.directory is not None else range(len(dataset))
        missing = [i for i in share if self.key(dataset.records[i]) not in self]
        lengths = dataset.lengths
        missing.sort(key=lambda i: lengths[i])
        device = next(model.audio_tower.parameters()).device
        was_training = model.audio_tower.training
        model.audio_tower.eval()
        try:
            for start in tqdm(range(0, len(missing), batch_size), desc="caching encoder frames",
                              disable=not progress or not missing):
                index = missing[start : start + batch_size]
                batch = processor.extract_audio([dataset.load_audio(i) for i in index])
                frames, frame_lengths = model.encode_audio(
                    batch[model.audio_input_name].to(device), batch["attention_mask"].to(device)
                )
                for row, i in enumerate(index):
                    self.put(self.key(dataset.records[i]), frames[row, : int(frame_lengths[row])])
        finally:
            model.audio_tower.train(was_training)
        return len(missing)


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors written beside `path`, then renamed onto it: a killed run never leaves a truncated file."""
    from safetensors.torch import save_file

    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)

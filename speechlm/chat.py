"""Chat messages with audio: parsing, validation and flattening for `SpeechLMProcessor.apply_chat_template`.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str | list[part]}`. Parts:

- `{"type": "text", "text": str}`
- `{"type": "audio", "audio": 1-D array | path | bytes, "sampling_rate"?: int}` (`"path"` or `"url"` instead of
  `"audio"` also work; an array without a rate is taken at the call's `sampling_rate`, else the encoder's)
- OpenAI's `{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav" | "mp3" | ...}}`
- vLLM's `{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,..."}}`

Audio lives in user messages only (as in OpenAI's API). Nothing is fetched from the network: an http(s) URL is a
`ChatError`. Every problem raises `ChatError`, which names the conversation, message and part (a server turns it into
a 400 that points at the bad `messages[i].content[j]`; a data pipeline into `file:line: problem`).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .factory import AUDIO_TOKEN

ROLES = ("system", "user", "assistant")
AUDIO_ROLES = ("user",)
PART_TYPES = ("text", "audio", "input_audio", "audio_url")
DEFAULT_MAX_CLIPS = 8


class ChatError(ValueError):
    """A bad conversation, message or content part; `location` says which (`conversation[0].messages[1]...`)."""

    def __init__(self, problem: str, conversation: int | None = None, message: int | None = None,
                 part: int | None = None):
        self.problem = problem
        self.conversation = conversation
        self.message = message
        self.part = part
        super().__init__(f"{self.location}: {problem}" if self.location else problem)

    @property
    def location(self) -> str:
        where = f"conversation[{self.conversation}]" if self.conversation is not None else ""
        if self.message is not None:
            where += f".messages[{self.message}]" if where else f"messages[{self.message}]"
        if self.part is not None:
            where += f".content[{self.part}]"
        return where

    def __reduce__(self):  # DataLoader workers pickle exceptions
        return type(self), (self.problem, self.conversation, self.message, self.part)


@dataclass
class AudioPart:
    """One clip, not decoded yet: `source` is an array, a path (str), or encoded file bytes."""

    source: Any
    sampling_rate: int | None = None
    name: str | None = None  # gives bytes an extension so the right decoder is picked
    where: tuple = ()  # (conversation, message, part) for error messages


@dataclass
class Message:
    role: str
    parts: list = field(default_factory=list)  # str (text) or AudioPart, in order

    @property
    def clips(self) -> list[AudioPart]:
        return [p for p in self.parts if isinstance(p, AudioPart)]


def as_batch(conversation: Any) -> tuple[list, bool]:
    """One conversation or a list of them -> (list of conversations, whether a batch was given)."""
    if isinstance(conversation, Mapping) or isinstance(conversation, str | bytes):
        raise ChatError("a conversation must be a list of messages (or a list of such lists), got "
                        f"{type(conversation).__name__}")
    if not isinstance(conversation, Sequence):
        raise ChatError(f"a conversation must be a list of messages, got {type(conversation).__name__}")
    if len(conversation) and all(isinstance(c, Sequence) and not isinstance(c, str | bytes) for c in conversation):
        return list(conversation), True
    return [conversation], False


def parse_conversation(messages: Any, index: int | None = 0, max_clips: int | None = DEFAULT_MAX_CLIPS,
                       base_dir: str | os.PathLike | None = None) -> list[Message]:
    """Validate one conversation's structure (audio is not decoded here); relative paths resolve against `base_dir`."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes | Mapping):
        raise ChatError(f"a conversation must be a list of messages, got {type(messages).__name__}", index)
    if not messages:
        raise ChatError("empty conversation: it needs at least one message", index)
    parsed = []
    for m, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatError(f"a message must be a dict with 'role' and 'content', got {type(message).__name__}",
                            index, m)
        role = message.get("role")
        if role not in ROLES:
            raise ChatError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}", index, m)
        parsed.append(Message(role, _parse_content(message.get("content"), role, (index, m), base_dir)))
    clips = sum(len(message.clips) for message in parsed)
    if max_clips is not None and clips > max_clips:
        raise ChatError(f"{clips} audio clips, more than max_clips={max_clips}", index)
    return parsed


def _parse_content(content: Any, role: str, where: tuple, base_dir) -> list:
    if isinstance(content, str):
        _check_text(content, where)
        return [content] if content else []
    if not isinstance(content, Sequence) or isinstance(content, bytes | Mapping):
        raise ChatError(f"content must be a string or a list of parts, got {type(content).__name__}", *where)
    parts = []
    for p, part in enumerate(content):
        at = (*where, p)
        if not isinstance(part, Mapping) or "type" not in part:
            raise ChatError("a content part must be a dict with a 'type'", *at)
        kind = part["type"]
        if kind not in PART_TYPES:
            raise ChatError(f"unknown content part type {kind!r}; expected one of {', '.join(PART_TYPES)}", *at)
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatError(f"a text part needs 'text' as a string, got {type(text).__name__}", *at)
            _check_text(text, at)
            if text:
                parts.append(text)
            continue
        if role not in AUDIO_ROLES:
            raise ChatError(f"audio is only allowed in {'/'.join(AUDIO_ROLES)} messages, not in a {role} message",
                            *at)
        parts.append(_parse_audio(kind, part, at, base_dir))
    return parts


def _check_text(text: str, where: tuple) -> None:
    if AUDIO_TOKEN in text:
        raise ChatError(f"text contains the audio placeholder {AUDIO_TOKEN}; pass audio as an audio part instead",
                        *where)


def _parse_audio(kind: str, part: Mapping, where: tuple, base_dir) -> AudioPart:
    rate = part.get("sampling_rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0):
        raise ChatError(f"'sampling_rate' must be a positive integer, got {rate!r}", *where)
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("data"), str):
            raise ChatError("an input_audio part needs {'data': <base64 string>, 'format': ...}", *where)
        fmt = spec.get("format") or "wav"
        if not isinstance(fmt, str) or not fmt.isalnum():
            raise ChatError(f"input_audio 'format' must be a short name like 'wav' or 'mp3', got {fmt!r}", *where)
        return AudioPart(_base64(spec["data"], where), None, f"input_audio.{fmt.lower()}", where)
    if kind == "audio_url":
        spec = part.get("audio_url")
        url = spec.get("url") if isinstance(spec, Mapping) else spec
        if not isinstance(url, str):
            raise ChatError("an audio_url part needs {'url': ...}", *where)
        return _from_string(url, where, base_dir)
    present = [key for key in ("audio", "path", "url") if part.get(key) is not None]
    if len(present) != 1:
        raise ChatError(f"an audio part needs exactly one of 'audio', 'path' or 'url', got {present or 'none'}",
                        *where)
    value = part[present[0]]
    if isinstance(value, str | os.PathLike):
        return _from_string(os.fspath(value), where, base_dir)
    if isinstance(value, bytes | bytearray | memoryview):
        if not len(value):
            raise ChatError("audio bytes are empty", *where)
        return AudioPart(bytes(value), None, None, where)
    if isinstance(value, np.ndarray | list | tuple) or (hasattr(value, "detach") and hasattr(value, "cpu")):
        return AudioPart(value, rate, None, where)
    raise ChatError(f"unsupported audio value of type {type(value).__name__}: pass a 1-D array, a path, bytes or "
                    "base64 input_audio", *where)


def _from_string(value: str, where: tuple, base_dir) -> AudioPart:
    lowered = value.lower()
    if lowered.startswith(("http://", "https://", "ftp://")):
        raise ChatError("audio URLs are not fetched (no network access here): download the file and pass its path, "
                        "its bytes, or base64 input_audio", *where)
    if lowered.startswith("data:"):
        header, _, data = value.partition(",")
        if ";base64" not in header.lower():
            raise ChatError("a data: URL must be base64 encoded (data:audio/wav;base64,...)", *where)
        subtype = header[5:].split(";")[0].split("/")[-1].lower()
        fmt = {"mpeg": "mp3", "x-wav": "wav", "wave": "wav", "x-flac": "flac"}.get(subtype, subtype)
        return AudioPart(_base64(data, where), None, f"audio_url.{fmt or 'wav'}", where)
    if lowered.startswith("file://"):
        value = value[len("file://"):]
    if not value:
        raise ChatError("empty audio path", *where)
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return AudioPart(str(path), None, None, where)


def _base64(data: str, where: tuple) -> bytes:
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ChatError(f"audio data is not valid base64 ({error})", *where) from None
    if not decoded:
        raise ChatError("audio data is empty", *where)
    return decoded


def load_clip(part: AudioPart, sampling_rate: int, default_rate: int | None = None) -> np.ndarray:
    """Decode (or validate) one clip to mono float32 at `sampling_rate`; problems become a `ChatError`."""
    from .audio import AudioError, load_audio, validate_audio

    try:
        if isinstance(part.source, str | bytes):
            return load_audio(part.source, sampling_rate, name=part.name)
        rate = part.sampling_rate or default_rate or sampling_rate
        return validate_audio(part.source, rate, target_sampling_rate=sampling_rate)
    except AudioError as error:
        raise ChatError(f"bad audio: {error.problem}", *part.where) from None


def flatten(parts: Sequence, audio_text: str | None) -> str:
    """Parts -> one string: audio becomes `audio_text` (dropped when None); pieces join with a newline, except that
    adjacent clips touch. So `[audio, "T"]` -> `"<|audio|>\\nT"`, what `processor(audio, prompt="T")` writes."""
    out, previous = "", None
    for part in parts:
        is_audio = isinstance(part, AudioPart)
        if is_audio and audio_text is None:
            continue
        piece = audio_text if is_audio else part
        if previous is not None:
            out += "" if is_audio and previous == "audio" else "\n"
        out += piece
        previous = "audio" if is_audio else "text"
    return out


__all__ = ["AudioPart", "ChatError", "Message", "as_batch", "flatten", "load_clip", "parse_conversation"]

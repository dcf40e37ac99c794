"""Training data: JSONL manifests and Hugging Face datasets -> records -> `SpeechLMDataset` -> `SpeechLMCollator`.

A manifest is JSON Lines, one utterance a line: `{"audio": path, "text": ..., "prompt"?: ..., "task"?: ...,
"id"?: ..., "duration"?: seconds}`, or a chat `{"messages": [...], "task"?: ..., "id"?: ...}` whose user messages
carry audio parts (`speechlm.chat`; the loss then covers the assistant messages only, and one manifest may mix both
kinds of rows); relative audio paths resolve against the manifest's folder, so a corpus folder can be moved as a
whole. Every problem is reported as `file:line: problem`; `on_error="skip"` drops the bad lines and
logs how many were skipped and why (never silently), `on_error="raise"` lists them all in one `ManifestError`.

Batches are exactly what `SpeechLMProcessor` produces, so training sees the same features as inference;
`DurationGroupedSampler` batches clips of similar duration together (less padding). With a
frozen encoder, `EncoderCache` stores each clip's encoder frames once and the collator feeds them back as
`encoder_frames` every epoch (the encoder is usually most of the compute of a projector/LoRA run).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from .audio import AudioError, audio_duration, load_audio, validate_audio

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")
_MAX_LISTED_ISSUES = 20


# ---------------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ManifestIssue:
    """One unusable entry: where it is (`file:line` or `dataset[index]`) and what is wrong with it."""

    location: str
    problem: str

    def __str__(self) -> str:
        return f"{self.location}: {self.problem}"


class ManifestError(ValueError):
    """Raised with `on_error="raise"`; lists every bad entry (the first 20 in the message, all in `issues`)."""

    def __init__(self, issues: Sequence[ManifestIssue], source: str = "manifest"):
        self.issues = list(issues)
        lines = [str(issue) for issue in self.issues[:_MAX_LISTED_ISSUES]]
        if len(self.issues) > _MAX_LISTED_ISSUES:
            lines.append(f"... and {len(self.issues) - _MAX_LISTED_ISSUES} more")
        super().__init__(
            f"{len(self.issues)} unusable entr{'y' if len(self.issues) == 1 else 'ies'} in {source} "
            "(fix them, or pass on_error='skip' to drop them):\n" + "\n".join(lines)
        )


@dataclass
class Manifest:
    """Usable records plus what was skipped. Records are dicts with `audio` (path, bytes or array), `text`,
    `prompt`, `task`, `id`, `duration` (seconds, None if unknown), `sampling_rate` (arrays only) and `location`."""

    records: list[dict[str, Any]]
    skipped: list[ManifestIssue] = field(default_factory=list)
    source: str = "records"

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]

    def select(self, limit: int | None) -> Manifest:
        """The first `limit` records (e.g. a quick evaluation subset)."""
        if limit is None or limit >= len(self.records):
            return self
        return Manifest(self.records[:limit], self.skipped, self.source)


def _finish(records: list[dict], issues: list[ManifestIssue], source: str, on_error: str, total: int) -> Manifest:
    if issues and on_error == "raise":
        raise ManifestError(issues, source)
    if issues:
        listed = "\n".join(f"  {issue}" for issue in issues[:_MAX_LISTED_ISSUES])
        more = f"\n  ... and {len(issues) - _MAX_LISTED_ISSUES} more" if len(issues) > _MAX_LISTED_ISSUES else ""
        logger.warning("skipped %d of %d entries of %s:\n%s%s", len(issues), total, source, listed, more)
    if not records:
        raise ManifestError(issues or [ManifestIssue(source, "no usable entries")], source)
    return Manifest(records, issues, source)


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")


class _EntryProblem(Exception):
    """What is wrong with one entry; becomes a `ManifestIssue` with the entry's location."""


def _text_field(raw: Mapping, key: str, required: bool) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise _EntryProblem(f"missing '{key}'")
        return None
    if not isinstance(value, str):
        raise _EntryProblem(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _duration_of(audio: Any, sampling_rate: int | None, given: Any, probe: bool, name: str) -> float | None:
    """Seconds of audio: counted for arrays, read from the file header when probing, else the manifest's value."""
    if given is not None and (
        isinstance(given, bool) or not isinstance(given, int | float) or not math.isfinite(given) or given <= 0
    ):
        raise _EntryProblem(f"'duration' must be a positive number of seconds, got {given!r}")
    if isinstance(audio, np.ndarray):
        return audio.shape[-1] / sampling_rate
    if probe and isinstance(audio, str):
        try:
            duration = audio_duration(audio, name=name)
        except AudioError as error:
            raise _EntryProblem(error.problem) from None
        if duration <= 0:
            raise _EntryProblem("audio file has no samples")
        return duration
    if given is None and isinstance(audio, bytes):  # in-memory files (HF datasets): the header, if soundfile reads it
        try:
            info = sf.info(io.BytesIO(audio))
            return info.frames / info.samplerate
        except (sf.SoundFileError, RuntimeError):
            return None  # compressed formats: known once decoded
    return float(given) if given is not None else None


def _normalise(
    raw: Any,
    location: str,
    base_dir: Path | None,
    probe_audio: bool,
    audio_key: str = "audio",
    text_key: str = "text",
    sampling_rate: int | None = None,
) -> dict[str, Any]:
    """One raw entry -> a record dict, or `_EntryProblem` saying what is wrong."""
    if not isinstance(raw, Mapping):
        raise _EntryProblem(f"expected a JSON object, got {type(raw).__name__}")
    if raw.get("messages") is not None:
        return _normalise_chat(raw, location, base_dir, probe_audio, audio_key, text_key)
    if raw.get(audio_key) is None:
        raise _EntryProblem(f"missing '{audio_key}'")
    text = _text_field(raw, text_key, required=True)
    if not text.strip():
        raise _EntryProblem(f"empty '{text_key}': nothing to learn from or to score against")
    prompt = _text_field(raw, "prompt", required=False)
    task = _text_field(raw, "task", required=False)
    audio, record_rate, name = _audio_field(raw[audio_key], base_dir, raw.get("sampling_rate", sampling_rate))
    name = name or location
    if isinstance(audio, str) and not os.path.isfile(audio):
        raise _EntryProblem(f"audio file not found: {audio}")
    duration = _duration_of(audio, record_rate, raw.get("duration"), probe_audio, name)
    record_id = raw.get("id")
    return {
        "audio": audio,
        "sampling_rate": record_rate,
        "text": text,
        "prompt": prompt,
        "task": task,
        "id": str(record_id) if record_id is not None else location,
        "duration": duration,
        "location": location,
        "name": name,
    }


def _normalise_chat(raw: Mapping, location: str, base_dir: Path | None, probe_audio: bool, audio_key: str,
                    text_key: str) -> dict[str, Any]:
    """A chat row: messages validated now (roles, parts, files), audio decoded only when the item is loaded."""
    from .chat import AudioPart, ChatError, flatten, parse_conversation

    for key in (audio_key, text_key, "prompt"):
        if raw.get(key) is not None:
            raise _EntryProblem(f"a chat row carries its audio and text in 'messages'; it cannot also have '{key}'")
    task = _text_field(raw, "task", required=False)
    try:
        messages = parse_conversation(raw["messages"], None, max_clips=None, base_dir=base_dir)
    except ChatError as error:
        raise _EntryProblem(str(error) if error.location else f"'messages': {error.problem}") from None
    answers = [message for message in messages if message.role == "assistant"]
    if not answers:
        raise _EntryProblem("'messages' has no assistant message: nothing to learn")
    duration = 0.0
    for m, message in enumerate(messages):
        for p, part in enumerate(message.parts):
            if not isinstance(part, AudioPart):
                continue
            where = f"messages[{m}].content[{p}]"
            if isinstance(part.source, str) and not os.path.isfile(part.source):
                raise _EntryProblem(f"{where}: audio file not found: {part.source}")
            if not isinstance(part.source, str | bytes) and not part.sampling_rate:
                raise _EntryProblem(f"{where}: an audio array needs its 'sampling_rate'")
            try:
                seconds = _duration_of(part.source, part.sampling_rate, None, probe_audio, part.name or where)
            except _EntryProblem as problem:
                raise _EntryProblem(f"{where}: {problem}") from None
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
        raise _EntryProblem(f"audio dict needs 'array', 'bytes' or 'path', got keys {sorted(value)}")
    if hasattr(value, "get_all_samples"):  # a torchcodec AudioDecoder from a decoding `datasets.Audio` column
        samples = value.get_all_samples()
        return _audio_field(samples.data.numpy(), base_dir, int(samples.sample_rate))
    if isinstance(value, np.ndarray | list | tuple | torch.Tensor):
        if not sampling_rate:
            raise _EntryProblem("an audio array needs its 'sampling_rate'")
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.ndim == 2:  # (channels, samples) or (samples, channels): averaged like load_audio does
            array = array.mean(axis=int(np.argmin(array.shape)))
        if array.ndim != 1 or array.size == 0:
            raise _EntryProblem(f"audio array must be 1-D and non-empty, got shape {array.shape}")
        return np.ascontiguousarray(array, dtype=np.float32), int(sampling_rate), None
    raise _EntryProblem(f"unsupported audio value of type {type(value).__name__}")


def read_manifest(path: str | os.PathLike, on_error: str = "raise", probe_audio: bool = True,
                  min_seconds: float | None = None, max_seconds: float | None = None) -> Manifest:
    """Read a JSONL manifest; every entry is checked now, so that a bad file fails before training starts.

    `probe_audio` reads each file's header (duration, and a readable file) without decoding it. Clips outside
    `[min_seconds, max_seconds]` are dropped and reported whatever `on_error` says: they are valid, just unwanted.
    """
    _check_on_error(on_error)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    base_dir = path.resolve().parent
    records, issues, total = [], [], 0
    with open(path, "rb") as handle:  # bytes: one line that is not UTF-8 is that line's problem, not the file's
        for number, data in enumerate(handle, start=1):
            if not data.strip():
                continue
            total += 1
            location = f"{path}:{number}"
            try:
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise _EntryProblem(f"not UTF-8 text (byte {error.start + 1} of the line)") from None
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as error:
                    raise _EntryProblem(f"invalid JSON ({error.msg} at column {error.colno})") from None
                records.append(_normalise(raw, location, base_dir, probe_audio))
            except _EntryProblem as problem:
                issues.append(ManifestIssue(location, str(problem)))
    return _filter_durations(_finish(records, issues, str(path), on_error, total), min_seconds, max_seconds)


def records_from_dataset(dataset, on_error: str = "raise", audio_column: str = "audio", text_column: str = "text",
                         sampling_rate: int | None = None, name: str | None = None, probe_audio: bool = True,
                         min_seconds: float | None = None, max_seconds: float | None = None) -> Manifest:
    """Records from a Hugging Face `datasets.Dataset` (or any sequence of dicts).

    The audio column may hold paths, bytes, `{"array", "sampling_rate"}` dicts or plain arrays (with
    `sampling_rate=`). An `Audio` column is read undecoded (`decode=False`: path/bytes), so no torchcodec is needed;
    decoding happens in `SpeechLMDataset` with speechlm's own audio loader.
    """
    _check_on_error(on_error)
    source = name or getattr(getattr(dataset, "info", None), "dataset_name", None) or "dataset"
    features = getattr(dataset, "features", None)
    if features is not None and audio_column in features and type(features[audio_column]).__name__ == "Audio":
        if getattr(features[audio_column], "decode", False):
            import datasets

            dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    records, issues = [], []
    for index, raw in enumerate(dataset):
        location = f"{source}[{index}]"
        try:
            records.append(_normalise(raw, location, None, probe_audio, audio_column, text_column, sampling_rate))
        except _EntryProblem as problem:
            issues.append(ManifestIssue(location, str(problem)))
    return _filter_durations(_finish(records, issues, source, on_error, len(records) + len(issues)),
                             min_seconds, max_seconds)


def _filter_durations(manifest: Manifest, min_seconds: float | None, max_seconds: float | None) -> Manifest:
    if min_seconds is None and max_seconds is None:
        return manifest
    kept, dropped = [], []
    for record in manifest.records:
        duration = record["duration"]
        if duration is not None and max_seconds is not None and duration > max_seconds:
            dropped.append(ManifestIssue(record["location"], f"{duration:.2f} s is longer than max_seconds"))
        elif duration is not None and min_seconds is not None and duration < min_seconds:
            dropped.append(ManifestIssue(record["location"], f"{duration:.2f} s is shorter than min_seconds"))
        else:
            kept.append(record)
    if dropped:
        logger.warning("dropped %d of %d clips of %s outside [%s, %s] s", len(dropped), len(manifest),
                       manifest.source, min_seconds, max_seconds)
    return _finish(kept, manifest.skipped + dropped, manifest.source, "skip", len(manifest.records))


def load_records(source: Any, on_error: str = "raise", **kwargs) -> Manifest:
    """A manifest path, a `Manifest`, a `datasets.Dataset` or a list of dicts -> `Manifest`."""
    if isinstance(source, Manifest):
        return source
    if isinstance(source, str | os.PathLike):
        return read_manifest(source, on_error=on_error, **kwargs)
    if isinstance(source, Iterable) or hasattr(source, "__getitem__"):
        return records_from_dataset(source, on_error=on_error, name=kwargs.pop("name", "records"), **kwargs)
    raise TypeError(f"expected a manifest path, a Manifest, a datasets.Dataset or a list of dicts, got {type(source)}")


def load_record_audio(record: Mapping[str, Any], sampling_rate: int) -> np.ndarray:
    """A record's audio as mono float32 at `sampling_rate` (the encoder's rate)."""
    if record.get("messages") is not None:
        raise ValueError(f"{record.get('location')}: a chat row (messages) has no single audio clip; load it through "
                         "SpeechLMDataset, which decodes every clip of the chat")
    audio = record["audio"]
    if isinstance(audio, np.ndarray):
        return validate_audio(audio, record["sampling_rate"], name=record["location"],
                              target_sampling_rate=sampling_rate)
    if isinstance(audio, bytes):
        return load_audio(audio, sampling_rate, name=record.get("name") or record.get("location"))
    return load_audio(audio, sampling_rate)


def resolve_prompt(record: Mapping[str, Any], task_prompts: Mapping[str, str] | None = None) -> str | None:
    """The record's own prompt, else its task's prompt, else None (the processor's default prompt).

    A chat row's instruction is in its messages: its `task` only labels it (e.g. for per-task loss), so it needs
    no prompt.
    """
    if record.get("messages") is not None:
        return None
    if record.get("prompt") is not None:
        return record["prompt"]
    task = record.get("task")
    if task is not None and task_prompts:
        if task not in task_prompts:
            raise KeyError(f"{record.get('location')}: task {task!r} has no prompt; known: {sorted(task_prompts)}")
        return task_prompts[task]
    return None


# ---------------------------------------------------------------------------------------------------------- dataset
class SpeechLMDataset(torch.utils.data.Dataset):
    """Records -> `{"audio": float32 array at the encoder's rate, "text", "prompt", "task", "id"}`, decoded on access;
    a chat row -> `{"messages": its chat with every clip decoded, "text", "task", "id"}`.

    With an `encoder_cache` that holds a clip, the item carries its `cache_key` instead of audio, so a cached epoch
    decodes no audio at all. Chat rows cannot use the cache (their clips are not cached one by one yet).
    `audio_layout="prefix"` checks now that every chat row has exactly the one clip that layout takes.
    """

    def __init__(self, records: Manifest | Sequence[dict], sampling_rate: int,
                 task_prompts: Mapping[str, str] | None = None, encoder_cache: EncoderCache | None = None,
                 audio_layout: str | None = None):
        self.records = list(records)
        self.sampling_rate = int(sampling_rate)
        self.task_prompts = dict(task_prompts or {})
        self.encoder_cache = encoder_cache
        for record in self.records:  # fail now, not at step 10 000, on a task without a prompt
            resolve_prompt(record, self.task_prompts)
        chats = [r for r in self.records if r.get("messages") is not None]
        if chats and encoder_cache is not None:
            raise ValueError(
                f"{chats[0]['location']}: the encoder cache does not support chat rows ('messages') yet: train "
                "without it (data.encoder_cache: null)"
            )
        if audio_layout == "prefix":
            bad = [r["location"] for r in chats if sum(len(m.clips) for m in r["messages"]) != 1]
            if bad:
                raise ValueError(
                    f"{len(bad)} chat row(s) without exactly one audio clip, e.g. {bad[0]}: the prefix audio layout "
                    "takes one clip per conversation; build the model with audio_layout='placeholder' for several"
                )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        """Per-clip lengths in milliseconds for length-grouped batching (text length when the duration is unknown)."""
        return [
            int(1000 * r["duration"]) if r.get("duration") else 60 * len(r["text"]) for r in self.records
        ]

    def load_audio(self, index: int) -> np.ndarray:
        return load_record_audio(self.records[index], self.sampling_rate)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        if record.get("messages") is not None:
            return {"messages": self._decoded_chat(record), "text": record["text"], "task": record.get("task"),
                    "id": record["id"]}
        item = {"text": record["text"], "prompt": resolve_prompt(record, self.task_prompts),
                "task": record.get("task"), "id": record["id"]}
        if self.encoder_cache is not None:
            key = self.encoder_cache.key(record)
            if key in self.encoder_cache:
                item["cache_key"] = key
                return item
        item["audio"] = self.load_audio(index)
        return item


    def _decoded_chat(self, record: Mapping[str, Any]) -> list[dict]:
        """The record's chat in the message format, every clip decoded to the encoder's rate."""
        from .chat import AudioPart, load_clip

        messages = []
        for message in record["messages"]:
            content = [
                {"type": "audio", "audio": load_clip(part, self.sampling_rate), "sampling_rate": self.sampling_rate}
                if isinstance(part, AudioPart) else {"type": "text", "text": part}
                for part in message.parts
            ]
            messages.append({"role": message.role, "content": content})
        return messages


class SpeechLMCollator:
    """Items -> exactly what `SpeechLMModel.forward` takes: the processor's output, or cached encoder frames + text.

    The audio path is `processor(audios, text=targets, prompt=prompts)` itself, so training batches cannot drift
    from what inference feeds the model; chat items go through the processor's chat template path
    (`apply_chat_template(..., return_labels=True)`), and a plain item in the same batch is encoded exactly as alone.
    """

    def __init__(self, processor, encoder_cache: EncoderCache | None = None):
        self.processor = processor
        self.encoder_cache = encoder_cache

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if any(f.get("messages") is not None for f in features):
            return self._with_chats(features)
        texts = [f["text"] for f in features]
        prompts = [f.get("prompt") for f in features]
        cached = ["cache_key" in f and "audio" not in f for f in features]
        if not any(cached):
            return dict(self.processor([f["audio"] for f in features], text=texts, prompt=prompts))
        if not all(cached) or self.encoder_cache is None:
            raise ValueError("a batch mixes cached and uncached clips: fill the EncoderCache before training")
        frames = [self.encoder_cache.get(f["cache_key"]) for f in features]
        lengths = torch.tensor([f.shape[0] for f in frames], dtype=torch.long)
        padded = frames[0].new_zeros(len(frames), int(lengths.max()), frames[0].shape[-1])
        for index, clip in enumerate(frames):
            padded[index, : clip.shape[0]] = clip
        batch = {"encoder_frames": padded, "encoder_frame_lengths": lengths}
        batch.update(self.processor.encode_text([self.processor.build_prompt(p) for p in prompts], texts))
        return batch

    def _with_chats(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        from .chat import ChatError

        processor = self.processor
        if any("audio" not in f and f.get("messages") is None for f in features):
            raise ValueError("chat rows cannot be batched with cached encoder frames: train without the encoder cache")
        clips, rows, label_rows = [], [], []
        for index, feature in enumerate(features):
            if feature.get("messages") is None:
                clips.append(feature["audio"])
                ids, labels = processor._text_row(processor.build_prompt(feature.get("prompt")), feature["text"])
            else:
                try:
                    parsed = processor._parse_chat(feature["messages"], index, max_clips=None)
                    chat_clips, (ids,), (labels,) = processor._chat_rows([parsed], add_generation_prompt=False,
                                                                         return_labels=True)
                except ChatError as error:
                    raise ValueError(f"{feature.get('id')}: {error}") from None
                clips += chat_clips
            rows.append(ids)
            label_rows.append(labels)
        return processor._pack(clips, rows, label_rows)


class DurationGroupedSampler(LengthGroupedSampler):
    """transformers' `LengthGroupedSampler` on known durations, reseeded from `seed + epoch` at every epoch.

    Durations come from the manifest (the stock sampler decodes every item to measure it). Seeding per epoch instead
    of drawing from one running generator makes epoch `e`'s order a function of `e` alone, so a run resumed from a
    checkpoint sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, batch_size: int, lengths: Sequence[int], seed: int = 0):
        super().__init__(batch_size, lengths=list(lengths))
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


# ---------------------------------------------------------------------------------------------------- encoder cache
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

    Keys combine the encoder fingerprint with the clip's path, size and mtime (or a hash of its bytes/samples), so an
    edited file or a different encoder is a cache miss, never a stale hit. Frames are kept in the encoder's dtype,
    which makes a cached forward identical to an uncached one.
    """

    def __init__(self, fingerprint: str, directory: str | os.PathLike | None = None):
        self.fingerprint = fingerprint
        self.directory = Path(directory) / fingerprint[:16] if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model, processor, storage: str = "memory", directory: str | os.PathLike | None = None):
        """`storage="memory"` or `"disk"` (under `directory`, default `speechlm.cache.cache_dir("encoder_frames")`)."""
        if storage not in ("memory", "disk"):
            raise ValueError(f"encoder cache storage must be 'memory' or 'disk', got {storage!r}")
        if any(p.requires_grad for p in model.audio_tower.parameters()):
            raise ValueError("the encoder is being trained: its outputs change every step and cannot be cached")
        if storage == "disk" and directory is None:
            from .cache import cache_dir

            directory = cache_dir("encoder_frames")
        return cls(encoder_fingerprint(model, processor), directory if storage == "disk" else None)

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
        frames = frames.detach().to("cpu").contiguous()
        if self.directory is None:
            self._memory[key] = frames
            return
        from safetensors.torch import save_file

        partial = self._file(key).with_suffix(f".{os.getpid()}.tmp")
        save_file({"frames": frames}, str(partial))
        os.replace(partial, self._file(key))  # atomic: a killed run never leaves a truncated entry

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


__all__ = [
    "DurationGroupedSampler",
    "EncoderCache",
    "Manifest",
    "ManifestError",
    "ManifestIssue",
    "SpeechLMCollator",
    "SpeechLMDataset",
    "encoder_fingerprint",
    "load_record_audio",
    "load_records",
    "read_manifest",
    "records_from_dataset",
    "resolve_prompt",
]

"""Manifests: JSONL files and Hugging Face datasets -> checked records (`Manifest`), every problem named.

A manifest is JSON Lines, one utterance a line: `{"audio": path, "text": ..., "prompt"?: ..., "task"?: ...,
"id"?: ..., "duration"?: seconds}`, or a chat `{"messages": [...], "task"?: ..., "id"?: ...}` whose user messages
carry audio parts (`speechlm.chat`; one manifest may mix both kinds of rows; each entry is checked by
`speechlm.data.records`); relative audio paths resolve against the manifest's folder, so a corpus folder can be moved
as a whole. Every problem is reported as `file:line: problem`; `on_error="skip"` drops the bad lines and logs how many
were skipped and why (never silently), `on_error="raise"` lists them all in one `ManifestError`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import EntryProblem, normalise_entry

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")
_MAX_LISTED_ISSUES = 20


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
    `prompt`, `task`, `transcript` (what the clip says, when `text` is another answer), `id`, `duration` (seconds,
    None if unknown), `sampling_rate` (arrays only) and `location`; a manifest's other fields are kept as they are
    in `extra` (e.g. a `source` or `speaker` column)."""

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
                    raise EntryProblem(f"not UTF-8 text (byte {error.start + 1} of the line)") from None
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as error:
                    raise EntryProblem(f"invalid JSON ({error.msg} at column {error.colno})") from None
                record = normalise_entry(raw, location, base_dir, probe_audio)
                record["extra"] = {key: value for key, value in raw.items() if key not in record and key != "messages"}
                records.append(record)
            except EntryProblem as problem:
                issues.append(ManifestIssue(location, str(problem)))
    return _filter_durations(_finish(records, issues, str(path), on_error, total), min_seconds, max_seconds)


def read_text_examples(path: str | os.PathLike, task_prompts: dict[str, str] | None = None,
                       on_error: str = "raise") -> list[dict[str, str]]:
    """A JSONL file of text-only examples, `{"transcript": the words, "text": the answer, "prompt"? or "task"?}`
    a line (the prompt resolved as for clips: its own, else its task's), for `SpeechLMCollator(text_examples=...)`:
    the words stand where a clip would. Problems are reported as `file:line: problem`, as for audio manifests."""
    from .dataset import resolve_prompt

    _check_on_error(on_error)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text examples not found: {path}")
    examples, issues, total = [], [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        total += 1
        location = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            issues.append(ManifestIssue(location, f"not valid JSON ({error.msg})"))
            continue
        if not isinstance(raw, dict):
            issues.append(ManifestIssue(location, f"expected a JSON object, got {type(raw).__name__}"))
            continue
        missing = [key for key in ("transcript", "text") if not isinstance(raw.get(key), str) or not raw[key].strip()]
        if missing:
            issues.append(ManifestIssue(location, f"needs a non-empty {' and '.join(missing)}"))
            continue
        try:
            prompt = resolve_prompt({**raw, "location": location}, task_prompts)
        except KeyError as error:
            issues.append(ManifestIssue(location, str(error.args[0]).split(": ", 1)[-1]))
            continue
        if not prompt:
            issues.append(ManifestIssue(location, "needs a prompt, or a task with one in task_prompts"))
            continue
        examples.append({"transcript": raw["transcript"], "text": raw["text"], "prompt": prompt,
                         "task": raw.get("task")})
    return _finish(examples, issues, str(path), on_error, total).records


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
            records.append(normalise_entry(raw, location, None, probe_audio, audio_column, text_column, sampling_rate))
        except EntryProblem as problem:
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

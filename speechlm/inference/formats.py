"""What a transcription looks like on the way out: timed segments, plain text, SubRip, WebVTT and JSON.

Pure data and string formatting (no torch), shared by `speechlm transcribe` and the server.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Segment:
    """A transcribed stretch of a recording; `start`/`end` in seconds from the recording's start."""

    start: float
    end: float
    text: str


def format_timestamp(seconds: float, decimal_marker: str = ".") -> str:
    """HH:MM:SS.mmm (WebVTT) or, with `decimal_marker=","`, HH:MM:SS,mmm (SubRip)."""
    milliseconds = max(0, round(seconds * 1000))
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{milliseconds:03d}"


def segments_text(segments: Sequence[Segment]) -> str:
    return " ".join(segment.text for segment in segments if segment.text).strip()


def segments_to_srt(segments: Sequence[Segment]) -> str:
    """SubRip subtitles; segments without text are left out (subtitle players show empty cues as gaps anyway)."""
    cues = [segment for segment in segments if segment.text]
    return "".join(
        f"{index}\n{format_timestamp(c.start, ',')} --> {format_timestamp(c.end, ',')}\n{c.text}\n\n"
        for index, c in enumerate(cues, 1)
    )


def segments_to_vtt(segments: Sequence[Segment]) -> str:
    """WebVTT subtitles; segments without text are left out."""
    cues = [f"{format_timestamp(c.start)} --> {format_timestamp(c.end)}\n{c.text}\n\n" for c in segments if c.text]
    return "WEBVTT\n\n" + "".join(cues)


@dataclass
class Transcript:
    """One input's result as `speechlm transcribe` writes it, in whichever format was asked for."""

    audio: str
    duration: float
    segments: list[Segment] = field(default_factory=list)
    id: str | None = None

    @property
    def text(self) -> str:
        return segments_text(self.segments)

    def render(self, fmt: str, indent: int | None = None) -> str:
        if fmt == "txt":
            return self.text + "\n"
        if fmt == "srt":
            return segments_to_srt(self.segments)
        if fmt == "vtt":
            return segments_to_vtt(self.segments)
        record: dict[str, Any] = {"audio": self.audio} | ({"id": self.id} if self.id is not None else {})
        record |= {"text": self.text, "duration": round(self.duration, 3)}
        record["segments"] = [asdict(segment) for segment in self.segments]
        return json.dumps(record, ensure_ascii=False, indent=indent) + "\n"


__all__ = ["Segment", "Transcript", "format_timestamp", "segments_text", "segments_to_srt", "segments_to_vtt"]

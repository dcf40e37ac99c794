"""Real, open-vocabulary speech for the demo: the voice acting of The Ur-Quan Masters (Debian `uqm-voice` and
`uqm-content`, section non-free; licence CC BY-NC-SA 2.5, non-commercial).

2,218 Ogg clips by 27 characters (distinct actors, several accents, 11,025 Hz), ~11 h, with transcripts. They are
fetched into the cache by `scripts/fetch_nonfree.sh` (never committed). Why here: the espeak-rendered corpus teaches
the model espeak, not people; these are people, reading open-domain text.

Characters are split by *actor*: some never appear in training and are the held-out set; three are reserved for
the project's own external evaluation and are never read at all; a few are heavily processed (robotic, pitched)
and left out of training by default. Several actors voice more than one character (the game's credits,
`base/cutscene/credits/credits.txt` in uqm-content), so a character-level split would hear a held-out or reserved
voice in training under another name.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from speechlm.cache import cache_dir

UQM_PACKAGES = ("uqm-voice", "uqm-content")
CONTENT_DIR = Path("usr/share/games/uqm/content")
VOICE_ZIP = CONTENT_DIR / "addons/uqm-0.8.0-voice.uqm"
CONTENT_ZIP = CONTENT_DIR / "packages/uqm-0.8.0-content.uqm"

RESERVED = frozenset({"syreen", "spathi", "shofixti"})  # never trained, tuned or evaluated on
PROCESSED = frozenset({"orz", "urquan", "kohrah", "mycon", "probe", "slylandro"})  # robotic or pitched voices
HELD_OUT = ("commander", "yehat", "supox")  # unseen speakers: the demo's real-speech test set
# Characters who share an actor, from the game's credits: Alex Bennett is the Starbase Commander (`commander`
# before the starbase is freed, `starbase` after); Madeleine Wild voices the Syreen, the VUX and one of the three
# Zoq-Fot-Pik heads; David Bryce the Spathi, the Shofixti, the Ilwrath and the Kohr-Ah. The credits name Bruce
# Leyland for the Yehat alone; the Yehat rebels are the same race's lines, so taken as his. A character missing
# here is its own actor.
SHARED_ACTORS = (
    frozenset({"commander", "starbase"}),
    frozenset({"syreen", "vux", "zoqfotpik"}),
    frozenset({"spathi", "shofixti", "ilwrath", "kohrah"}),
    frozenset({"yehat", "yehatrebels"}),
)
MAX_SECONDS = 15.0
# Speaking rates outside this band (words per second) mean the transcript is not what the clip says: some script
# entries hold a whole speech while their clip holds its first sentence, some clips are a sob or a snort.
WORDS_PER_SECOND = (0.7, 4.6)


@dataclass(frozen=True)
class Line:
    """One voiced line: character, clip name inside the voice zip, raw transcript."""

    character: str
    clip: str
    text: str


def same_actor(characters) -> frozenset[str]:
    """`characters` and every character voiced by one of their actors."""
    voices = set(characters)
    for group in SHARED_ACTORS:
        if group & voices:
            voices |= group
    return frozenset(voices)


def nonfree_root() -> Path:
    """Where `scripts/fetch_nonfree.sh` unpacks Debian's non-free packages (inside the cache)."""
    return cache_dir("nonfree") / "root"


def is_available(root: Path | None = None) -> bool:
    root = root or nonfree_root()
    return (root / VOICE_ZIP).is_file() and (root / CONTENT_ZIP).is_file()


_ENTRY = re.compile(r"#\((\w+)\)\s+(\S+\.ogg)\s*$")


def parse_transcripts(text: str, character: str) -> list[Line]:
    """`#(LINE_ID)<tab>clip.ogg` then the spoken text up to a blank line or the next `#(`; lines without a clip are
    the player's (never voiced) and are skipped."""
    lines, clip, body = [], None, []

    def flush():
        if clip and " ".join(body).strip():
            lines.append(Line(character, clip, " ".join(body).strip()))

    for raw in text.splitlines():
        if raw.startswith("#("):
            flush()
            match = _ENTRY.match(raw.strip())
            clip, body = (match.group(2) if match else None), []
        elif not raw.strip():
            flush()
            clip, body = None, []
        elif clip:
            body.append(raw.strip())
    flush()
    return lines


def clean_transcript(text: str) -> str:
    """Game script -> plain spoken words: `*emphasis*` marks, `--` dashes and quotes dropped, numbers as words."""
    from ..evaluation.normalizers import normalize_text

    text = text.replace("*", " ").replace("--", " ").replace("`", "'").replace("_", " ")
    return normalize_text(text, spell_numbers=True)


def voiced_lines(root: Path | None = None) -> list[Line]:
    """Every voiced line with a cleaned, non-empty transcript, except those of the reserved characters' actors."""
    root = root or nonfree_root()
    lines, never_read = [], same_actor(RESERVED)
    with zipfile.ZipFile(root / CONTENT_ZIP) as content, zipfile.ZipFile(root / VOICE_ZIP) as voice:
        clips = set(voice.namelist())
        for name in sorted(content.namelist()):
            match = re.fullmatch(r"base/comm/(\w+)/\1\.txt", name)
            if not match or match.group(1) in never_read:
                continue
            character = match.group(1)
            for line in parse_transcripts(content.read(name).decode("utf-8", errors="replace"), character):
                text = clean_transcript(line.text)
                if text and f"3dovoice/{character}/{line.clip}" in clips:
                    lines.append(Line(character, line.clip, text))
    return lines


def read_clip(voice_zip: zipfile.ZipFile, line: Line) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sampling rate) of one clip, decoded from the zip in memory."""
    data = voice_zip.read(f"3dovoice/{line.character}/{line.clip}")
    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    return (audio.mean(axis=1) if audio.ndim > 1 else audio), rate


def split_lines(lines: list[Line], held_out: tuple[str, ...] = HELD_OUT, include_processed: bool = False
                ) -> tuple[list[Line], list[Line]]:
    """(train, test) by actor: the held-out characters are the test set, and no character of their actors is
    trained on; processed voices are dropped from training unless asked for (they are not how people sound)."""
    unseen = same_actor(held_out)
    train = [ln for ln in lines if ln.character not in unseen
             and (include_processed or ln.character not in PROCESSED)]
    test = [ln for ln in lines if ln.character in held_out]
    return train, test


def plausible(text: str, seconds: float) -> bool:
    """Does a clip of `seconds` plausibly say `text`? (A speaking rate within `WORDS_PER_SECOND`.)"""
    low, high = WORDS_PER_SECOND
    return seconds > 0 and low <= len(text.split()) / seconds <= high


def write_clips(root: Path, lines: list[Line], folder: str, max_seconds: float = MAX_SECONDS,
                uqm_root: Path | None = None) -> list[dict]:
    """Decode each clip, drop those over `max_seconds` or whose transcript is not `plausible`, write 16 kHz wavs
    under root/audio/folder; manifest rows (source "uqm", with the character as speaker)."""
    from .render import manifest_row, write16k

    rows = []
    with zipfile.ZipFile((uqm_root or nonfree_root()) / VOICE_ZIP) as voice:
        for line in lines:
            audio, rate = read_clip(voice, line)
            if len(audio) / rate > max_seconds or not plausible(line.text, len(audio) / rate):
                continue
            path = root / "audio" / folder / f"{Path(line.clip).stem}.wav"
            duration = write16k(audio, rate, path)
            rows.append(manifest_row(root, path, line.text, f"uqm-{Path(line.clip).stem}", duration, "uqm",
                             speaker=line.character))
    return rows

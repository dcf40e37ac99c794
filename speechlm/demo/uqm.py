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
# Where a script line may be cut: its sentence ends (and "--" breaks). A clip over MAX_SECONDS is cut only at such
# an end that falls in a pause of at least MIN_PAUSE_SECONDS (silero-vad), and only if every piece speaks its text's
# characters within RATE_TOLERANCE of the clip's own rate: a cut one sentence off moves a piece's rate far more.
SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\s+--\s+")
MIN_PAUSE_SECONDS = 0.15
RATE_TOLERANCE = 1.3
MAX_READING_WORDS = 20  # a Pico reading of an unheard line's piece: up to ~7 s, like the longer training clips
EDGE_SECONDS = 0.1  # kept before the first and after the last word: the VAD's edges are tight


@dataclass(frozen=True)
class Line:
    """One voiced line: character, clip name inside the voice zip, raw transcript."""

    character: str
    clip: str
    text: str
    sentences: tuple[str, ...] = ()  # `text` cut at the script's sentence ends: where a long clip may be cut


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


def sentences_of(raw: str, text: str) -> tuple[str, ...]:
    """`raw`'s sentences, each cleaned; empty when they do not join back into `text` (the cleaned whole), so a
    line is never cut where its words would not add up."""
    sentences = tuple(s for s in (clean_transcript(part) for part in SENTENCE_END.split(raw)) if s)
    return sentences if len(sentences) > 1 and " ".join(sentences) == text else ()


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
                    lines.append(Line(character, line.clip, text, sentences_of(line.text, text)))
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


def texts_for_pico(rows: list[dict]) -> list[str]:
    """The training clips' texts that Pico reads beside them: whole lines only (a cut piece is part of one), and not
    those of processed voices (an option that adds those voices would otherwise add Pico readings too)."""
    return [row["text"] for row in rows if "cut_from" not in row and row["speaker"] not in PROCESSED]


def unheard_line_pieces(lines: list[Line], rows: list[dict], max_words: int = MAX_READING_WORDS) -> list[str]:
    """The texts of `lines` whose clips no training row holds (too long, or not what the clip says), for Pico to
    read: each line cut at its sentence ends into pieces of at most `max_words` words (a longer sentence at a word
    boundary). Processed voices' lines are left out, as in `texts_for_pico`."""
    heard = {row.get("cut_from") or row["id"].removeprefix("uqm-") for row in rows}
    pieces = []
    for line in lines:
        if Path(line.clip).stem in heard or line.character in PROCESSED:
            continue
        piece: list[str] = []
        for sentence in line.sentences or (line.text,):
            words = sentence.split()
            if piece and len(piece) + len(words) > max_words:
                pieces.append(" ".join(piece))
                piece = []
            piece += words
            while len(piece) > max_words:
                pieces.append(" ".join(piece[:max_words]))
                piece = piece[max_words:]
        if piece:
            pieces.append(" ".join(piece))
    return pieces


def plausible(text: str, seconds: float) -> bool:
    """Does a clip of `seconds` plausibly say `text`? (A speaking rate within `WORDS_PER_SECOND`.)"""
    low, high = WORDS_PER_SECOND
    return seconds > 0 and low <= len(text.split()) / seconds <= high


def cut_at_pauses(sentences: tuple[str, ...], speech: list[tuple[float, float]], max_seconds: float
                  ) -> list[tuple[float, float, str]]:
    """Pieces (start, end in seconds, text) of a clip whose `speech` regions (from a VAD, in order) say
    `sentences`, each piece at most `max_seconds`, cut in the middle of pauses; [] when no cut fits.

    The cuts are chosen together (dynamic programming over sentence ends x pauses): the pieces' durations must
    follow their texts' lengths at the clip's own speaking rate, which a boundary one sentence off breaks.
    """
    pauses = [(a_end, b_start) for (_, a_end), (b_start, _) in zip(speech, speech[1:])
              if b_start - a_end >= MIN_PAUSE_SECONDS]
    if len(sentences) < 2 or not pauses:
        return []
    times = [max(0.0, speech[0][0] - EDGE_SECONDS)] + [(a + b) / 2 for a, b in pauses] + [speech[-1][1] + EDGE_SECONDS]
    chars = np.cumsum([0] + [len(s) + 1 for s in sentences])
    seconds_per_char = (times[-1] - times[0]) / chars[-1]
    n_sentences, n_cuts = len(sentences), len(times) - 1

    def cost(b0, p0, b1, p1):
        seconds = times[p1] - times[p0]
        return np.log(seconds / ((chars[b1] - chars[b0]) * seconds_per_char)) ** 2 if seconds <= max_seconds else None

    best = {(0, 0): (0.0, None)}  # (sentences used, cut reached) -> (cost, previous state)
    for b1 in range(1, n_sentences + 1):
        for p1 in range(1, n_cuts + 1):
            if (b1 == n_sentences) != (p1 == n_cuts):
                continue  # the last sentence ends where the speech ends, and only there
            options = [(c0 + c, (b0, p0)) for (b0, p0), (c0, _) in best.items()
                       if b0 < b1 and p0 < p1 and (c := cost(b0, p0, b1, p1)) is not None]
            if options:
                best[(b1, p1)] = min(options)
    if (n_sentences, n_cuts) not in best:
        return []
    pieces, state = [], (n_sentences, n_cuts)
    while best[state][1] is not None:
        (b0, p0), (b1, p1) = best[state][1], state
        pieces.append((times[p0], times[p1], " ".join(sentences[b0:b1])))
        state = (b0, p0)
    pieces.reverse()
    ratios = [(end - start) / ((len(text) + 1) * seconds_per_char) for start, end, text in pieces]
    if any(not 1 / RATE_TOLERANCE <= r <= RATE_TOLERANCE for r in ratios):
        return []
    return pieces if all(plausible(text, end - start) for start, end, text in pieces) else []


def speech_regions(audio16k: np.ndarray, vad_model) -> list[tuple[float, float]]:
    """(start, end) seconds of each stretch of speech in a 16 kHz clip, by silero-vad, unpadded."""
    import torch
    from silero_vad import get_speech_timestamps

    from .render import SAMPLE_RATE

    found = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(audio16k, dtype=np.float32)), vad_model,
                                  sampling_rate=SAMPLE_RATE, min_silence_duration_ms=round(MIN_PAUSE_SECONDS * 1000),
                                  speech_pad_ms=0)
    return [(region["start"] / SAMPLE_RATE, region["end"] / SAMPLE_RATE) for region in found]


def write_clips(root: Path, lines: list[Line], folder: str, max_seconds: float = MAX_SECONDS,
                uqm_root: Path | None = None, cut_long: bool = False) -> list[dict]:
    """Decode each clip, drop those whose transcript is not `plausible`, write 16 kHz wavs under root/audio/folder;
    manifest rows (source "uqm", with the character as speaker). A clip over `max_seconds` is dropped, or with
    `cut_long` cut at its sentence ends into pieces that fit (`cut_at_pauses`; a clip that cannot be is dropped)."""
    from ..audio import resample_audio
    from .render import SAMPLE_RATE, manifest_row, write16k

    rows, vad_model = [], None
    with zipfile.ZipFile((uqm_root or nonfree_root()) / VOICE_ZIP) as voice:
        for line in lines:
            audio, rate = read_clip(voice, line)
            seconds, stem = len(audio) / rate, Path(line.clip).stem
            if not plausible(line.text, seconds):
                continue
            if seconds <= max_seconds:
                path = root / "audio" / folder / f"{stem}.wav"
                duration = write16k(audio, rate, path)
                rows.append(manifest_row(root, path, line.text, f"uqm-{stem}", duration, "uqm", speaker=line.character))
                continue
            if not cut_long or not line.sentences:
                continue
            if vad_model is None:
                from ..inference.segmentation import load_vad_model

                vad_model = load_vad_model()
            audio16k = resample_audio(audio, rate, SAMPLE_RATE)
            pieces = cut_at_pauses(line.sentences, speech_regions(audio16k, vad_model), max_seconds)
            for i, (start, end, text) in enumerate(pieces):
                path = root / "audio" / folder / f"{stem}-{i}.wav"
                piece = audio16k[round(start * SAMPLE_RATE):round(end * SAMPLE_RATE)]
                duration = write16k(piece, SAMPLE_RATE, path)
                rows.append(manifest_row(root, path, text, f"uqm-{stem}-{i}", duration, "uqm", speaker=line.character,
                                         cut_from=stem))
    return rows

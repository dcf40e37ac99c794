"""Data for the offline demo: a structured everyday domain spoken by espeak-ng, plus real speech to test transfer.

Why this shape: a Whisper encoder + small LLM can only learn to transcribe in ~15 CPU minutes if the domain is narrow
(voice commands, numbers, dates, phone menus) but combinatorial, so that the test set is made of *unseen sentences*
spoken by *unseen voices*. Real human prompts from the Asterisk PBX share that phone-menu vocabulary (transfer), and
five LibriVox clips show how far the model is from open-domain speech.

Everything comes from Debian packages (no network): espeak-ng, asterisk-core-sounds-en(-wav), pocketsphinx-testdata
and optionally fortunes. Text is always lower-case words without punctuation (in-word apostrophes kept, as in
"o'clock"), numbers written as words, so WER is well defined. Manifests are JSONL, one utterance a line:
`{"audio": <path relative to the manifest>, "text", "id", "duration", "source"}`.

Here: the texts (grammar, fortunes, Asterisk and LibriVox prompts), the splits and the build; the voices and audio
are `speechlm.demo.render`'s, the Debian packages `speechlm.demo.system_packages`'.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from speechlm.cache import cache_dir

from ..evaluation.normalizers import normalize_text
from .grammar import is_held_out, split_sentences
from .render import PICO_VOICES, prompt_rows, render_jobs, synthetic_rows, voices
from .system_packages import (
    ASTERISK_TRANSCRIPTS,
    LIBRIVOX_DIR,
    asterisk_sound_dir,
    check_system_packages,
    fortune_files,
    uqm_is_available,
)

# Bump when generation changes, so that cached corpora built by older code are rebuilt.
CORPUS_VERSION = 3
SOURCES = ("synthetic", "asterisk", "librivox", "fortunes", "uqm", "uqm_tts")


# ----------------------------------------------------------------------------------------------------------------
# Open-domain sentences (fortunes)
# ----------------------------------------------------------------------------------------------------------------

FORTUNE_FILES = ("fortunes", "literature", "riddles", "wisdom", "platitudes", "people", "work", "education",
                 "science", "humorists", "food", "pets", "love", "sports", "kids", "magic", "miscellaneous")
_FORTUNE_OK = re.compile(r"[A-Z][A-Za-z ,;'-]*[a-z][.!?]")


def fortune_sentences() -> list[str]:
    """Clean, normalised, 4-20 word sentences from the fortunes package, sorted and distinct (open-domain text)."""
    sentences: set[str] = set()
    for path in fortune_files():
        if path.name not in FORTUNE_FILES:
            continue
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [line for line in cookie.splitlines() if not re.match(r"\s*(--|\w+:\s)", line)]
            flat = " ".join(" ".join(lines).split())
            for sentence in re.split(r"(?<=[.!?])\s+", flat):
                if not sentence.isascii() or not _FORTUNE_OK.fullmatch(sentence):
                    continue
                text = normalize_text(sentence, spell_numbers=True)
                if 4 <= len(text.split()) <= 20:
                    sentences.add(text)
    return sorted(sentences)


def split_fortunes(n_train: int, n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded sample of fortune sentences, split by `is_held_out` like the grammar."""
    pool = fortune_sentences()
    random.Random(seed).shuffle(pool)
    train = [t for t in pool if not is_held_out(t)][:n_train]
    test = [t for t in pool if is_held_out(t)][:n_test]
    return train, test


# ----------------------------------------------------------------------------------------------------------------
# Voices and rendering
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# Real speech: Asterisk prompts and LibriVox clips
# ----------------------------------------------------------------------------------------------------------------

MAX_PROMPT_SECONDS = 15.0
ASTERISK_TEST_TEXTS = 60


@dataclass(frozen=True)
class Prompt:
    """A real recording and its normalised transcript."""

    name: str
    path: Path
    text: str


def asterisk_prompts(max_seconds: float = MAX_PROMPT_SECONDS) -> list[Prompt]:
    """Usable Asterisk prompts: a wav exists, transcript is plain speech, at most `max_seconds` long.

    Skipped: [sound effects], <tones>, (annotations), symbols spoken unpredictably, and numbers of three or more
    digits or decimals (is "1234" "one two three four" or "twelve thirty four"?).
    """
    sound_dir = asterisk_sound_dir()
    if sound_dir is None:
        return []
    prompts = []
    with gzip.open(ASTERISK_TRANSCRIPTS, "rt", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            name, sep, raw = line.strip().partition(":")
            if not sep or line.startswith(";"):
                continue
            raw = raw.strip()
            if re.search(r"[\[\]<>()@$=+/\"]|\d{3,}|\d\.\d", raw):
                continue
            path = sound_dir / f"{name.strip()}.wav"
            text = normalize_text(raw, spell_numbers=True)
            if not text or not path.is_file() or sf.info(path).duration > max_seconds:
                continue
            prompts.append(Prompt(name.strip(), path, text))
    return prompts


def split_asterisk(
    prompts: Sequence[Prompt], n_test_texts: int = ASTERISK_TEST_TEXTS, min_words: int = 3
) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out) prompts. Held-out texts are picked by a hash of the *text* (several prompts share one), so
    no test transcript is ever a training transcript; only phrases of `min_words`+ words are held out, because WER
    on single words ("c", "sixty") says little, while those words are useful in training."""
    candidates = {p.text for p in prompts if len(p.text.split()) >= min_words}
    texts = sorted(candidates, key=lambda t: (zlib.crc32(t.encode()), t))
    test_texts = set(texts[:n_test_texts])
    return [p for p in prompts if p.text not in test_texts], [p for p in prompts if p.text in test_texts]


def librivox_prompts() -> list[Prompt]:
    """The five LibriVox clips of pocketsphinx-testdata; `transcription` lines read `<s> text </s> (id)`."""
    prompts = []
    for line in (LIBRIVOX_DIR / "transcription").read_text().splitlines():
        match = re.fullmatch(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\(([^)]+)\)\s*", line)
        if match and (LIBRIVOX_DIR / f"{match.group(2)}.wav").is_file():
            text = normalize_text(match[1], spell_numbers=True)
            prompts.append(Prompt(match.group(2), LIBRIVOX_DIR / f"{match.group(2)}.wav", text))
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Manifests and the corpus build
# ----------------------------------------------------------------------------------------------------------------

# The mixed corpus's share of training sentences from the fortunes when `build_demo_corpus` is not told (half, as the
# mix was built before the share became an option): a corpus stamp and folder name record a share only when it
# differs, so older corpora stay valid. The demo's own default is `settings.DEFAULT_OPEN_SHARE`.
MIXED_OPEN_SHARE = 0.5
MANIFESTS = ("train", "test_synthetic", "test_fortunes", "test_asterisk", "test_librivox", "test_uqm")
# The rendered held-out sentences, one set per text source: a mixed corpus's grammar and fortunes are two domains,
# each with its own `WER <set>` line (an empty manifest for the source a corpus kind lacks).
HELD_OUT_BY_SOURCE = {"synthetic": "test_synthetic", "fortunes": "test_fortunes"}
STAMP = "corpus.json"
# Stamp entries that name a corpus's cache folder too, with their suffix (in this order, after `-real<fraction>`):
# optional ones, present only when set, so that a corpus built before its option stays valid under its old name.
FOLDER_SUFFIXES = {"uqm_cut_long": "-cut", "uqm_processed": "-processed", "uqm_pico_all_lines": "-picoall",
                   "voice_perturbation": "-vp{:g}", "accent_fraction": "-accent{:g}", "open_share": "-open{:g}"}


def corpus_folder(stamp: dict) -> str:
    """The cache folder's name of the corpus a stamp describes: one folder per corpus-changing setting."""
    name = f"corpus-{stamp['corpus']}-{stamp['n_train']}-{stamp['n_test']}-{stamp['seed']}"
    name += f"-real{stamp['natural_fraction']:g}" if stamp["real_speech"] else ""
    return name + "".join(suffix.format(stamp[key]) for key, suffix in FOLDER_SUFFIXES.items() if key in stamp)


def manifest_records(path: Path | str) -> list[dict]:
    """A demo manifest's records through the library's reader (`speechlm.data.read_manifest`: audio paths absolute,
    durations as written, `source` and the other demo columns in `extra`); [] for an empty set (no UQM data)."""
    from ..data import read_manifest

    path = Path(path)
    if not path.read_text().strip():
        return []
    return read_manifest(path, probe_audio=False).records


def write_manifest(path: Path, rows: Sequence[dict]) -> None:
    """A demo manifest, written whole or not at all (a reader reuses an existing one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    tmp.replace(path)


def _texts(corpus: str, n_train: int, n_test: int, seed: int, exclude: Sequence[str],
           open_share: float = MIXED_OPEN_SHARE) -> tuple[list, list]:
    """(text, source) pairs for train and test, by corpus kind. "mixed" takes `open_share` of the training sentences
    from the fortunes and half the test sentences whatever the share: runs with different shares face one test set."""
    if corpus == "structured":
        train, test = split_sentences(n_train, n_test, seed, exclude)
        return [(t, "synthetic") for t in train], [(t, "synthetic") for t in test]
    if corpus == "fortunes":
        train, test = split_fortunes(n_train, n_test, seed)
        return [(t, "fortunes") for t in train], [(t, "fortunes") for t in test]
    if corpus == "mixed":
        n_open = round(n_train * open_share)
        g_train, g_test = split_sentences(n_train - n_open, n_test - n_test // 2, seed, exclude)
        f_train, f_test = split_fortunes(n_open, n_test // 2, seed)
        mix = random.Random(seed)
        train = [(t, "synthetic") for t in g_train] + [(t, "fortunes") for t in f_train]
        test = [(t, "synthetic") for t in g_test] + [(t, "fortunes") for t in f_test]
        mix.shuffle(train)
        return train, test
    raise ValueError(f"corpus must be 'structured', 'fortunes' or 'mixed', not {corpus!r}")


def build_demo_corpus(
    root: Path | str | None = None,
    corpus: str = "structured",
    n_train: int = 9000,
    n_test: int = 200,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    real_speech: bool = False,
    natural_fraction: float = 0.0,
    cut_long_clips: bool = False,
    processed_voices: bool = False,
    pico_all_lines: bool = False,
    uqm_test: bool | None = None,
    voice_perturbation: float = 0.0,
    accent_fraction: float = 0.0,
    open_share: float = MIXED_OPEN_SHARE,
) -> dict[str, Path]:
    """Render and collect the demo corpus; returns manifest paths keyed by `MANIFESTS`.

    `corpus`: "structured" (grammar), "fortunes" (open-domain sentences) or "mixed" (`open_share` of the training
    sentences from the fortunes, the rest from the grammar; half the test sentences from each); the real-speech
    sets are the same for all. The held-out rendered sentences go to `test_synthetic` (grammar) and `test_fortunes`
    by their source. `train` holds rendered sentences + the Asterisk training prompts. A stamp with the
    parameters makes a second call with the same ones free; different ones rebuild the folder. Without a `root`, the
    corpus goes to a cache folder named by its parameters (`corpus_folder`).

    `real_speech` adds The Ur-Quan Masters voice acting (training characters' clips + Pico readings of their lines
    to `train`, held-out characters to `test_uqm`); `natural_fraction` of the training sentences are spoken by a
    Pico voice instead of espeak-ng; `cut_long_clips` adds the training characters' clips over 15 s, cut at
    sentence ends in pauses (`uqm.cut_at_pauses`; Pico does not read these); `processed_voices` adds the training
    actors' robotic or pitched voices (`uqm.PROCESSED`; nor these); `pico_all_lines` has Pico read the training
    actors' lines whose clips are not trained on too (`uqm.unheard_line_pieces`): their words without their voices.
    `uqm_test` (default: whenever the UQM data is present) fills `test_uqm` with the held-out characters even when
    `real_speech` is off: real speech is always measured, trained on or not.
    `voice_perturbation` > 0 plays each rendered training sentence back at a random rate in [1 - p, 1 + p] (never
    the test sentences): more vocal tracts than espeak's voices have, for voices training never heard.
    `accent_fraction` of the rendered training sentences get a simulated accent (`speechlm.demo.accents`).
    """
    if uqm_test is None:
        uqm_test = real_speech or uqm_is_available()
    check_system_packages(corpus, real_speech)
    params = {"version": CORPUS_VERSION, "corpus": corpus, "n_train": n_train, "n_test": n_test, "seed": seed,
              "real_speech": real_speech, "natural_fraction": natural_fraction, "uqm_test": uqm_test}
    if real_speech:  # its training clips changed when the split became one by actor (the test set did not)
        params["uqm_split"] = "actors"
    if cut_long_clips:
        params["uqm_cut_long"] = True
    if processed_voices:
        params["uqm_processed"] = True
    if pico_all_lines:
        params["uqm_pico_all_lines"] = True
    if voice_perturbation:  # only when on, so that corpora built before the option stay valid
        params["voice_perturbation"] = voice_perturbation
    if accent_fraction:
        params["accent_fraction"] = accent_fraction
    if corpus == "mixed" and open_share != MIXED_OPEN_SHARE:
        params["open_share"] = open_share
    root = Path(root) if root is not None else cache_dir("demo", corpus_folder(params))
    root.mkdir(parents=True, exist_ok=True)
    manifests = {name: root / f"{name}.jsonl" for name in MANIFESTS}
    stamp = root / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        if not manifests["test_fortunes"].is_file() and manifests["test_synthetic"].is_file():
            # Built before the fortunes had their own set: the same clips, split without re-rendering (unstamped
            # meanwhile, so that an interrupted split rebuilds rather than loses rows).
            stamp.unlink()
            split_held_out(manifests)
            stamp.write_text(json.dumps(params, indent=2) + "\n")
        if all(p.is_file() for p in manifests.values()):
            return manifests
    # Stale or interrupted build: drop what we wrote (only our own folders) so no orphan wav survives.
    stamp.unlink(missing_ok=True)
    for source in SOURCES:
        shutil.rmtree(root / "audio" / source, ignore_errors=True)

    prompts_train, prompts_test = split_asterisk(asterisk_prompts())
    train_texts, test_texts = _texts(corpus, n_train, n_test, seed, exclude=[p.text for p in prompts_test],
                                     open_share=open_share)
    natural = PICO_VOICES if real_speech else ()
    train_jobs = render_jobs(train_texts, voices(held_out=False), root / "audio", "train", seed, natural,
                             natural_fraction, voice_perturbation, accent_fraction)
    test_jobs = render_jobs(test_texts, voices(held_out=True), root / "audio", "test", seed)
    train_rows = synthetic_rows(root, train_jobs, workers, "render train", progress)
    test_rows = synthetic_rows(root, test_jobs, workers, "render test", progress)
    train_rows += prompt_rows(root, prompts_train, "asterisk/train", "asterisk", workers, "asterisk train", progress)
    asterisk_rows = prompt_rows(root, prompts_test, "asterisk/test", "asterisk", workers, "asterisk test", progress)
    librivox_rows = prompt_rows(root, librivox_prompts(), "librivox", "librivox", workers, "librivox", progress)
    uqm_rows = []
    if real_speech or uqm_test:
        from . import uqm

        uqm_train, uqm_held_out = uqm.split_lines(uqm.voiced_lines(), include_processed=processed_voices)
        uqm_rows = uqm.write_clips(root, uqm_held_out, "uqm/test")
    if real_speech:
        kept = uqm.write_clips(root, uqm_train, "uqm/train", cut_long=cut_long_clips)
        train_rows += kept
        texts = uqm.texts_for_pico(kept) + (uqm.unheard_line_pieces(uqm_train, kept) if pico_all_lines else [])
        readings = render_jobs([(text, "uqm_tts") for text in texts], PICO_VOICES, root / "audio", "train", seed)
        train_rows += synthetic_rows(root, readings, workers, "pico reads uqm lines", progress)

    for name, rows in (("train", train_rows), ("test_asterisk", asterisk_rows), ("test_librivox", librivox_rows),
                       ("test_uqm", uqm_rows), *held_out_by_source(test_rows).items()):
        write_manifest(manifests[name], rows)
    stamp.write_text(json.dumps(params, indent=2) + "\n")
    return manifests


def held_out_by_source(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """The rendered held-out rows as `HELD_OUT_BY_SOURCE`'s manifests (each in the order given)."""
    return {name: [row for row in rows if row["source"] == source] for source, name in HELD_OUT_BY_SOURCE.items()}


def split_held_out(manifests: dict[str, Path]) -> None:
    """Rewrites a corpus whose `test_synthetic` still holds every rendered source into one manifest per source."""
    rows = [json.loads(line) for line in manifests["test_synthetic"].read_text().splitlines() if line.strip()]
    for name, kept in held_out_by_source(rows).items():
        write_manifest(manifests[name], kept)


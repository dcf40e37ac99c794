"""Data for the offline demo: a structured everyday domain spoken by espeak-ng, plus real speech to test transfer.

Why this shape: a Whisper encoder + small LLM can only learn to transcribe in ~15 CPU minutes if the domain is narrow
(voice commands, numbers, dates, phone menus) but combinatorial, so that the test set is made of *unseen sentences*
spoken by *unseen voices*. Real human prompts from the Asterisk PBX share that phone-menu vocabulary (transfer), and
five LibriVox clips show how far the model is from open-domain speech.

Everything comes from Debian packages (no network): espeak-ng, asterisk-core-sounds-en(-wav), pocketsphinx-testdata
and optionally fortunes. Text is always lower-case words without punctuation (in-word apostrophes kept, as in
"o'clock"), numbers written as words, so WER is well defined. Manifests are JSONL, one utterance a line:
`{"audio": <path relative to the manifest>, "text", "id", "duration", "source"}`.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import subprocess
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from speechlm.cache import cache_dir

from .grammar import is_held_out, split_sentences
from .text import normalise_text

SAMPLE_RATE = 16_000
# Bump when generation changes, so that cached corpora built by older code are rebuilt.
CORPUS_VERSION = 3
SOURCES = ("synthetic", "asterisk", "librivox", "fortunes", "uqm", "uqm_tts")

# ----------------------------------------------------------------------------------------------------------------
# System packages
# ----------------------------------------------------------------------------------------------------------------

ASTERISK_SOUND_DIRS = (
    Path("/usr/share/asterisk/sounds/en_US_f_Allison"),
    Path("/usr/share/asterisk/sounds/en_US"),
    Path("/usr/share/asterisk/sounds/en"),
)
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
FORTUNES_DIR = Path("/usr/share/games/fortunes")


class MissingSystemPackage(RuntimeError):
    """A Debian package the demo corpus is made from is not installed; the message says how to install it."""


def _asterisk_sound_dir() -> Path | None:
    return next((d for d in ASTERISK_SOUND_DIRS if (d / "activated.wav").is_file()), None)


def _fortune_files() -> list[Path]:
    if not FORTUNES_DIR.is_dir():
        return []
    return sorted(p for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.suffix)


def uqm_is_available() -> bool:
    from .uqm import is_available

    return is_available()


def _package_checks(corpus: str, real_speech: bool = False) -> dict[str, Callable[[], bool]]:
    checks: dict[str, Callable[[], bool]] = {
        "espeak-ng": lambda: shutil.which("espeak-ng") is not None,
        "asterisk-core-sounds-en-wav": lambda: _asterisk_sound_dir() is not None,
        "asterisk-core-sounds-en": lambda: ASTERISK_TRANSCRIPTS.is_file(),
        "pocketsphinx-testdata": lambda: (LIBRIVOX_DIR / "transcription").is_file(),
    }
    if corpus in ("fortunes", "mixed"):
        checks["fortunes"] = lambda: bool(_fortune_files())
    if real_speech:
        checks["libttspico-utils"] = lambda: shutil.which("pico2wave") is not None
        checks["uqm-voice uqm-content"] = uqm_is_available
    return checks


def missing_system_packages(corpus: str = "structured", real_speech: bool = False) -> list[str]:
    """Debian packages needed for `corpus` that are not installed (checked by their files, not by dpkg)."""
    return [name for name, present in _package_checks(corpus, real_speech).items() if not present()]


def install_command(packages: Sequence[str]) -> str:
    """The exact shell command that installs `packages` (with sudo when we are not root)."""
    sudo = "" if _is_root() else "sudo "
    return f"{sudo}apt-get update && {sudo}apt-get install -y {' '.join(packages)}"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


NONFREE_HINT = ("bash scripts/fetch_nonfree.sh uqm-voice uqm-content (into the cache; non-commercial licence) and, as "
                "root, bash scripts/fetch_nonfree.sh --install libttspico-utils (scripts/setup.sh does both)")


def check_system_packages(corpus: str = "structured", real_speech: bool = False) -> None:
    """Fail early, with the install command, rather than halfway through a build."""
    missing = missing_system_packages(corpus, real_speech)
    nonfree = [name for name in missing if "uqm" in name or "pico" in name]
    if nonfree:
        raise MissingSystemPackage(f"The demo's real-speech data needs Debian non-free packages that are missing: "
                                   f"{', '.join(nonfree)}. Get them with:\n    {NONFREE_HINT}\n"
                                   "or run the demo with --no-real-speech.")
    if missing:
        raise MissingSystemPackage(
            f"The demo corpus needs Debian packages that are missing: {', '.join(missing)}. "
            f"Install them with:\n    {install_command(missing)}"
        )


def ensure_system_packages(install: bool = False, corpus: str = "structured", retries: int = 30,
                           real_speech: bool = False) -> None:
    """Install missing packages with apt-get when allowed (`install` and root); otherwise raise with the command.

    Another process may hold the dpkg lock (e.g. a concurrent apt run), so a failed apt-get is retried for a while.
    """
    missing = missing_system_packages(corpus)
    if not missing:
        check_system_packages(corpus, real_speech)
        return
    if not install or not _is_root() or shutil.which("apt-get") is None:
        check_system_packages(corpus, real_speech)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", *missing]):
        for attempt in range(retries):
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            locked = "lock" in (done.stderr + done.stdout).lower()
            if done.returncode == 0 or (command[1] == "update" and not locked):
                break  # a failed update (offline mirror) may still leave usable package lists
            if not locked or attempt == retries - 1:
                raise MissingSystemPackage(f"`{' '.join(command)}` failed:\n{done.stderr[-2000:]}")
            time.sleep(5)
    check_system_packages(corpus, real_speech)


# ----------------------------------------------------------------------------------------------------------------
# Open-domain sentences (fortunes)
# ----------------------------------------------------------------------------------------------------------------

FORTUNE_FILES = ("fortunes", "literature", "riddles", "wisdom", "platitudes", "people", "work", "education",
                 "science", "humorists", "food", "pets", "love", "sports", "kids", "magic", "miscellaneous")
_FORTUNE_OK = re.compile(r"[A-Z][A-Za-z ,;'-]*[a-z][.!?]")


def fortune_sentences() -> list[str]:
    """Clean, normalised, 4-20 word sentences from the fortunes package, sorted and distinct (open-domain text)."""
    sentences: set[str] = set()
    for path in _fortune_files():
        if path.name not in FORTUNE_FILES:
            continue
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [line for line in cookie.splitlines() if not re.match(r"\s*(--|\w+:\s)", line)]
            flat = " ".join(" ".join(lines).split())
            for sentence in re.split(r"(?<=[.!?])\s+", flat):
                if not sentence.isascii() or not _FORTUNE_OK.fullmatch(sentence):
                    continue
                text = normalise_text(sentence)
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

# en-us-nyc is left out: in espeak-ng 1.51 it speaks exactly like en-us.
ESPEAK_BASES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029")
# Intelligible variants only (no whisper, croak, robots or children).
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt",
                   "klatt2", "klatt3", "Andy", "Annie", "Alex", "Alicia", "Andrea", "adam", "anika", "aunty",
                   "benjamin", "david", "ed", "edward", "linda", "max", "Michael", "paul", "quincy", "rob", "robert",
                   "steph", "travis", "Denis", "Hugo", "Lee", "Mike", "belinda", "grandpa")
# Test-only: a whole accent plus a few variants, so that test voices are never heard in training.
HELD_OUT_BASES = ("en-029",)
HELD_OUT_VARIANTS = ("f4", "m6", "klatt3", "Annie", "robert", "Hugo")


def _voice(base: str, variant: str) -> str:
    return f"{base}+{variant}" if variant else base


# Natural-sounding voices with bundled weights (Debian non-free `libttspico-utils`): Whisper tiny.en reads them at
# 0-1.4 % WER against ~22 % for espeak-ng. `pico:` marks them for `render`.
PICO_VOICES = ("pico:en-US", "pico:en-GB")


def voices(held_out: bool) -> list[str]:
    """espeak-ng `-v` names for training (`held_out=False`) or for the test set only (`held_out=True`)."""
    return [
        _voice(b, v)
        for b in ESPEAK_BASES
        for v in ESPEAK_VARIANTS
        if (b in HELD_OUT_BASES or v in HELD_OUT_VARIANTS) == held_out
    ]


@dataclass(frozen=True)
class RenderJob:
    """One espeak-ng utterance: what to say, how, where the 16 kHz wav goes and which text source it is from."""

    text: str
    voice: str
    speed: int
    pitch: int
    path: Path
    source: str = "synthetic"


def _parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM from espeak's --stdout, whose header sizes are placeholders (streamed output)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not return a wav")
    pos, rate = 12, 22_050
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"fmt ":
            rate = int.from_bytes(data[pos + 12 : pos + 16], "little")
        if chunk == b"data":
            body = data[pos + 8 :]
            body = body[: len(body) // 2 * 2]
            return np.frombuffer(body, dtype="<i2").astype(np.float32) / 32768.0, rate
        pos += 8 + size
    raise RuntimeError("espeak-ng wav has no data chunk")


def _write16k(audio: np.ndarray, rate: int, path: Path) -> float:
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    return len(audio) / SAMPLE_RATE


def render_pico(job: RenderJob) -> float:
    """Speak `job.text` with SVOX Pico; `job.speed` (130-190) becomes a 0.9-1.1x speed perturbation (resampling, so
    pitch moves with it), the only variation a single Pico voice allows."""
    language = job.voice.removeprefix("pico:")
    job.path.parent.mkdir(parents=True, exist_ok=True)
    raw = job.path.with_name(job.path.stem + ".pico.wav")
    done = subprocess.run(["pico2wave", "-l", language, "-w", str(raw), job.text], capture_output=True, check=False)
    if done.returncode != 0 or not raw.is_file():
        raise RuntimeError(f"pico2wave failed for {language!r}: {done.stderr.decode(errors='replace')[-500:]}")
    audio, rate = sf.read(raw, dtype="float32")
    raw.unlink()
    factor = 0.9 + 0.2 * (min(max(job.speed, 130), 190) - 130) / 60
    return _write16k(audio, round(rate * factor), job.path)


def render(job: RenderJob) -> float:
    """Speak `job.text` with espeak-ng (or Pico for `pico:` voices) and write 16 kHz mono PCM; returns seconds."""
    if job.voice.startswith("pico:"):
        return render_pico(job)
    command = ["espeak-ng", "-v", job.voice, "-s", str(job.speed), "-p", str(job.pitch), "--stdout"]
    done = subprocess.run(command, input=job.text.encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"espeak-ng failed for {job.voice!r}: {done.stderr.decode(errors='replace')[-500:]}")
    audio, rate = _parse_wav(done.stdout)
    return _write16k(audio, rate, job.path)


def convert(source: Path, target: Path) -> float:
    """Any wav -> 16 kHz mono PCM wav; returns the duration in seconds."""
    audio, rate = sf.read(source, dtype="float32", always_2d=False)
    return _write16k(audio, rate, target)


def _parallel(fn: Callable, items: Sequence, workers: int, desc: str, progress: bool) -> list:
    """Ordered map over threads: the work is in espeak subprocesses and soxr, both outside the GIL."""
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=len(items), desc=desc, disable=not progress) as bar:
        results = []
        for result in pool.map(fn, items):
            results.append(result)
            bar.update()
    return results


def render_jobs(
    items: Sequence[tuple[str, str]], voice_pool: Sequence[str], folder: Path, split: str, seed: int,
    natural_voices: Sequence[str] = (), natural_fraction: float = 0.0,
) -> list[RenderJob]:
    """Seeded voice, speed (130-190 wpm) and pitch (30-70) for each (text, source); wavs go to folder/source/split.
    A `natural_fraction` share of the items is spoken by one of `natural_voices` instead."""
    rng = random.Random(f"{split}-{seed}")
    jobs = []
    for i, (text, source) in enumerate(items):
        voice, speed, pitch = rng.choice(voice_pool), rng.randint(130, 190), rng.randint(30, 70)
        if natural_voices and rng.random() < natural_fraction:
            voice = rng.choice(natural_voices)
        jobs.append(RenderJob(text, voice, speed, pitch, folder / source / split / f"{source}-{split}-{i:06d}.wav",
                              source))
    return jobs


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
    sound_dir = _asterisk_sound_dir()
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
            text = normalise_text(raw)
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
            prompts.append(Prompt(match.group(2), LIBRIVOX_DIR / f"{match.group(2)}.wav", normalise_text(match[1])))
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Manifests and the corpus build
# ----------------------------------------------------------------------------------------------------------------

MANIFESTS = ("train", "test_synthetic", "test_asterisk", "test_librivox", "test_uqm")
STAMP = "corpus.json"


def read_manifest(path: Path | str, absolute: bool = False) -> list[dict]:
    """Manifest lines as dicts; `absolute` turns audio paths (stored relative to the manifest) into absolute ones."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if absolute:
        for row in rows:
            row["audio"] = str((path.parent / row["audio"]).resolve())
    return rows


def _write_manifest(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    tmp.replace(path)


def _row(root: Path, path: Path, text: str, uid: str, duration: float, source: str, **extra: object) -> dict:
    return {"audio": path.relative_to(root).as_posix(), "text": text, "id": uid, "duration": round(duration, 4),
            "source": source, **extra}


def _synthetic_rows(root: Path, jobs: Sequence[RenderJob], workers: int, desc: str, progress: bool) -> list[dict]:
    durations = _parallel(render, jobs, workers, desc, progress)
    return [_row(root, j.path, j.text, j.path.stem, d, j.source, voice=j.voice, speed=j.speed, pitch=j.pitch)
            for j, d in zip(jobs, durations, strict=True)]


def _prompt_rows(root: Path, prompts: Sequence[Prompt], folder: str, source: str, workers: int, desc: str,
                 progress: bool) -> list[dict]:
    targets = [root / "audio" / folder / f"{p.name.replace('/', '-')}.wav" for p in prompts]
    durations = _parallel(lambda pair: convert(*pair), list(zip([p.path for p in prompts], targets, strict=True)),
                          workers, desc, progress)
    return [_row(root, t, p.text, f"{source}-{p.name.replace('/', '-')}", d, source)
            for p, t, d in zip(prompts, targets, durations, strict=True)]


def _texts(corpus: str, n_train: int, n_test: int, seed: int, exclude: Sequence[str]) -> tuple[list, list]:
    """(text, source) pairs for train and test, by corpus kind."""
    if corpus == "structured":
        train, test = split_sentences(n_train, n_test, seed, exclude)
        return [(t, "synthetic") for t in train], [(t, "synthetic") for t in test]
    if corpus == "fortunes":
        train, test = split_fortunes(n_train, n_test, seed)
        return [(t, "fortunes") for t in train], [(t, "fortunes") for t in test]
    if corpus == "mixed":
        g_train, g_test = split_sentences(n_train - n_train // 2, n_test - n_test // 2, seed, exclude)
        f_train, f_test = split_fortunes(n_train // 2, n_test // 2, seed)
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
    uqm_test: bool | None = None,
) -> dict[str, Path]:
    """Render and collect the demo corpus; returns manifest paths keyed by `MANIFESTS`.

    `corpus`: "structured" (grammar), "fortunes" (open-domain sentences) or "mixed" (half each); the real-speech
    sets are the same for all. `train` holds rendered sentences + the Asterisk training prompts. A stamp with the
    parameters makes a second call with the same ones free; different ones rebuild the folder.

    `real_speech` adds The Ur-Quan Masters voice acting (training characters' clips + Pico readings of their lines
    to `train`, held-out characters to `test_uqm`); `natural_fraction` of the training sentences are spoken by a
    Pico voice instead of espeak-ng. `uqm_test` (default: whenever the UQM data is present) fills `test_uqm` with
    the held-out characters even when `real_speech` is off: real speech is always measured, trained on or not.
    """
    if uqm_test is None:
        uqm_test = real_speech or uqm_is_available()
    check_system_packages(corpus, real_speech)
    root = Path(root) if root is not None else cache_dir("demo", f"corpus-{corpus}")
    root.mkdir(parents=True, exist_ok=True)
    params = {"version": CORPUS_VERSION, "corpus": corpus, "n_train": n_train, "n_test": n_test, "seed": seed,
              "real_speech": real_speech, "natural_fraction": natural_fraction, "uqm_test": uqm_test}
    manifests = {name: root / f"{name}.jsonl" for name in MANIFESTS}
    stamp = root / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == params and all(p.is_file() for p in manifests.values()):
        return manifests
    # Stale or interrupted build: drop what we wrote (only our own folders) so no orphan wav survives.
    stamp.unlink(missing_ok=True)
    for source in SOURCES:
        shutil.rmtree(root / "audio" / source, ignore_errors=True)

    prompts_train, prompts_test = split_asterisk(asterisk_prompts())
    train_texts, test_texts = _texts(corpus, n_train, n_test, seed, exclude=[p.text for p in prompts_test])
    natural = PICO_VOICES if real_speech else ()
    train_jobs = render_jobs(train_texts, voices(held_out=False), root / "audio", "train", seed, natural,
                             natural_fraction)
    test_jobs = render_jobs(test_texts, voices(held_out=True), root / "audio", "test", seed)
    train_rows = _synthetic_rows(root, train_jobs, workers, "render train", progress)
    test_rows = _synthetic_rows(root, test_jobs, workers, "render test", progress)
    train_rows += _prompt_rows(root, prompts_train, "asterisk/train", "asterisk", workers, "asterisk train", progress)
    asterisk_rows = _prompt_rows(root, prompts_test, "asterisk/test", "asterisk", workers, "asterisk test", progress)
    librivox_rows = _prompt_rows(root, librivox_prompts(), "librivox", "librivox", workers, "librivox", progress)
    uqm_rows = []
    if real_speech or uqm_test:
        from . import uqm

        uqm_train, uqm_held_out = uqm.split_lines(uqm.voiced_lines())
        uqm_rows = uqm.write_clips(root, uqm_held_out, "uqm/test")
    if real_speech:
        kept = uqm.write_clips(root, uqm_train, "uqm/train")
        train_rows += kept
        readings = render_jobs([(row["text"], "uqm_tts") for row in kept], PICO_VOICES, root / "audio", "train", seed)
        train_rows += _synthetic_rows(root, readings, workers, "pico reads uqm lines", progress)

    for name, rows in zip(MANIFESTS, (train_rows, test_rows, asterisk_rows, librivox_rows, uqm_rows), strict=True):
        _write_manifest(manifests[name], rows)
    stamp.write_text(json.dumps(params, indent=2) + "\n")
    return manifests


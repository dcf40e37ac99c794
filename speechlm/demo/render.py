"""The demo's voices and audio: espeak-ng and Pico voices (held-out ones for the test set), rendering a sentence to a
16 kHz mono wav, converting real recordings to the same form, and the manifest row of each clip written.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from ..audio import resample_audio

if TYPE_CHECKING:
    from .corpus import Prompt

SAMPLE_RATE = 16_000

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


def voice_group(voice: str) -> str:
    """Which kind of unheard voice a test clip's is: the accent training never had, or a new voice of a trained
    accent (the first holds most of the demo's misheard clips)."""
    if voice.split("+")[0] in HELD_OUT_BASES:
        return f"held-out accent ({'/'.join(HELD_OUT_BASES)})"
    return "held-out voice, training accent"


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
    # The wav is played back this much faster (resampled): tempo, pitch and formants move together, as in Kaldi's
    # speed perturbation, so one espeak voice stands for a range of vocal-tract lengths.
    rate_factor: float = 1.0
    accent: tuple[str, ...] = ()  # simulated accent: `speechlm.demo.accents` processes applied to the voice's phonemes


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


def write16k(audio: np.ndarray, rate: int, path: Path) -> float:
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    audio = resample_audio(audio, rate, SAMPLE_RATE)
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
    return write16k(audio, round(rate * factor), job.path)


def render(job: RenderJob) -> float:
    """Speak `job.text` with espeak-ng (or Pico for `pico:` voices) and write 16 kHz mono PCM; returns seconds."""
    if job.voice.startswith("pico:"):
        return render_pico(job)
    command = ["espeak-ng", "-v", job.voice, "-s", str(job.speed), "-p", str(job.pitch), "--stdout"]
    spoken = job.text
    if job.accent:
        from .accents import accented_phonemes

        spoken = accented_phonemes(job.text, job.voice, job.accent)
    done = subprocess.run(command, input=spoken.encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"espeak-ng failed for {job.voice!r}: {done.stderr.decode(errors='replace')[-500:]}")
    audio, rate = _parse_wav(done.stdout)
    return write16k(audio, round(rate * job.rate_factor), job.path)


def convert(source: Path, target: Path) -> float:
    """Any wav -> 16 kHz mono PCM wav; returns the duration in seconds."""
    audio, rate = sf.read(source, dtype="float32", always_2d=False)
    return write16k(audio, rate, target)


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
    natural_voices: Sequence[str] = (), natural_fraction: float = 0.0, perturbation: float = 0.0,
    accent_fraction: float = 0.0,
) -> list[RenderJob]:
    """Seeded voice, speed (130-190 wpm) and pitch (30-70) for each (text, source); wavs go to folder/source/split.
    A `natural_fraction` share of the items is spoken by one of `natural_voices` instead. `perturbation` > 0 plays
    each espeak clip back at a random rate in [1 - p, 1 + p] (`RenderJob.rate_factor`), drawn from a generator of
    its own, so the texts and voices equal those of the run without it. An `accent_fraction` share of the espeak clips
    gets a simulated accent (`speechlm.demo.accents`), from a third generator."""
    from .accents import ACCENT_PROCESS_SHARE, sample_accent

    rng, rates = random.Random(f"{split}-{seed}"), random.Random(f"perturb-{split}-{seed}")
    accents = random.Random(f"accent-{split}-{seed}")
    jobs = []
    for i, (text, source) in enumerate(items):
        voice, speed, pitch = rng.choice(voice_pool), rng.randint(130, 190), rng.randint(30, 70)
        if natural_voices and rng.random() < natural_fraction:
            voice = rng.choice(natural_voices)
        rate = round(1 + rates.uniform(-perturbation, perturbation), 3) if perturbation else 1.0
        accent = ()
        if accent_fraction and accents.random() < accent_fraction:
            while not accent:
                accent = sample_accent(accents, ACCENT_PROCESS_SHARE)
        natural = voice.startswith("pico:")
        jobs.append(RenderJob(text, voice, speed, pitch, folder / source / split / f"{source}-{split}-{i:06d}.wav",
                              source, rate_factor=1.0 if natural else rate, accent=() if natural else accent))
    return jobs


def manifest_row(root: Path, path: Path, text: str, uid: str, duration: float, source: str, **extra: object) -> dict:
    """One manifest line for the clip at `path`: audio relative to the corpus `root`, so the folder can move."""
    return {"audio": path.relative_to(root).as_posix(), "text": text, "id": uid, "duration": round(duration, 4),
            "source": source, **extra}


def synthetic_rows(root: Path, jobs: Sequence[RenderJob], workers: int, desc: str, progress: bool) -> list[dict]:
    """Render every job (in `workers` threads) and return their manifest rows, voice, speed and pitch included."""
    durations = _parallel(render, jobs, workers, desc, progress)
    return [manifest_row(root, j.path, j.text, j.path.stem, d, j.source, voice=j.voice, speed=j.speed, pitch=j.pitch,
                         **({"rate_factor": j.rate_factor} if j.rate_factor != 1 else {}),
                         **({"accent": list(j.accent)} if j.accent else {}))
            for j, d in zip(jobs, durations, strict=True)]


def prompt_rows(root: Path, prompts: Sequence[Prompt], folder: str, source: str, workers: int, desc: str,
                progress: bool) -> list[dict]:
    """Convert real recordings to 16 kHz wavs under root/audio/folder and return their manifest rows."""
    targets = [root / "audio" / folder / f"{p.name.replace('/', '-')}.wav" for p in prompts]
    durations = _parallel(lambda pair: convert(*pair), list(zip([p.path for p in prompts], targets, strict=True)),
                          workers, desc, progress)
    return [manifest_row(root, t, p.text, f"{source}-{p.name.replace('/', '-')}", d, source)
            for p, t, d in zip(prompts, targets, durations, strict=True)]

"""Waveform augmentation of training clips: speed perturbation, reverberation, noise, the telephone channel.

A record's `augment` field names one fixed transform of its audio, e.g. `"speed=0.9,reverb=0.3,noise=20,telephone,
seed=7"`, applied whenever the clip is loaded. Fixed (seeded), not drawn afresh each epoch, because a frozen encoder's
frames are cached: an augmented copy of a clip is encoded once, under its own cache key, and reused every epoch.
Several copies with different specs give a few real speakers the acoustic variety that identical repeats lack (the
real-speech recipe memorised identical repeats, README).

- `speed=F` (0.5-2): resampled so it plays F times faster, pitch shifted with it (Kaldi-style speed perturbation);
- `reverb=T` (0.05-2 s): convolved with a synthetic room response decaying by 60 dB in T seconds (tail at -3 dB
  against the direct sound);
- `noise=D` (-10-60 dB): white noise at a signal-to-noise ratio of D dB over the clip;
- `telephone`: band-limited to 300-3,400 Hz at 8 kHz, 8-bit mu-law (G.711), back at the clip's rate;
- `seed=N`: the random draws of reverb and noise (default 0).
They are applied in that order (a speaker in a room, a noisy line, the phone network).
"""

from __future__ import annotations

import numpy as np

from ..audio import resample_audio

# name -> (lowest, highest) accepted value; `telephone` takes none.
_RANGES = {"speed": (0.5, 2.0), "reverb": (0.05, 2.0), "noise": (-10.0, 60.0), "seed": (0, 2**32 - 1)}
_FLAGS = ("telephone",)
_PHONE_RATE = 8000
_PHONE_BAND = (300.0, 3400.0)
_MU = 255.0
_REVERB_TO_DIRECT = 0.5  # energy of the room's tail against the direct path's


def parse_augment(spec: str) -> dict[str, float]:
    """`"speed=0.9,telephone"` -> `{"speed": 0.9, "telephone": 1.0}`; a `ValueError` naming the spec on any problem."""
    parsed: dict[str, float] = {}
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name in _FLAGS and not value:
            parsed[name] = 1.0
            continue
        if name not in _RANGES:
            raise ValueError(f"augment {spec!r}: unknown transform {name!r}; known: "
                             f"{', '.join([*_RANGES, *_FLAGS])}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"augment {spec!r}: {name} needs a number, got {value!r}") from None
        low, high = _RANGES[name]
        if not low <= number <= high:
            raise ValueError(f"augment {spec!r}: {name} must be in [{low:g}, {high:g}], got {value}")
        if name == "seed" and not number.is_integer():
            raise ValueError(f"augment {spec!r}: seed must be an integer, got {value}")
        parsed[name] = number
    return parsed


def augment_audio(audio: np.ndarray, sampling_rate: int, spec: str) -> np.ndarray:
    """`audio` (mono float32 at `sampling_rate`) transformed as `spec` says; the same spec always gives the same
    output."""
    options = parse_augment(spec)
    rng = np.random.default_rng(int(options.get("seed", 0)))
    audio = np.asarray(audio, dtype=np.float32)
    if "speed" in options and options["speed"] != 1:
        # Read at sampling_rate / F, played at sampling_rate: F times faster.
        audio = resample_audio(audio, round(sampling_rate * options["speed"]), sampling_rate)
    if "reverb" in options:
        audio = _reverberate(audio, sampling_rate, options["reverb"], rng)
    if "noise" in options:
        power = float(np.mean(audio.astype(np.float64) ** 2))
        scale = np.sqrt(power / 10 ** (options["noise"] / 10))
        audio = audio + (scale * rng.standard_normal(audio.shape[0])).astype(np.float32)
    if "telephone" in options:
        audio = _telephone(audio, sampling_rate)
    return np.ascontiguousarray(np.clip(audio, -1.0, 1.0), dtype=np.float32)


def _reverberate(audio: np.ndarray, sampling_rate: int, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """Convolution with a direct path plus exponentially decaying noise (-60 dB after `rt60` s) carrying half the
    direct path's energy (a direct-to-reverberant ratio of +3 dB: a talker near the microphone); same length and
    peak as the dry clip, so only the room changes, not the level."""
    if audio.size == 0:
        return audio
    t = np.arange(max(2, int(rt60 * sampling_rate))) / sampling_rate
    tail = rng.standard_normal(t.size) * np.exp(-6.908 * t / rt60)
    tail[0] = 0.0
    response = tail * np.sqrt(_REVERB_TO_DIRECT / np.sum(tail**2))
    response[0] = 1.0
    size = 1 << int(np.ceil(np.log2(audio.size + response.size - 1)))
    wet = np.fft.irfft(np.fft.rfft(audio, size) * np.fft.rfft(response, size), size)[: audio.size]
    peak, wet_peak = float(np.abs(audio).max()), float(np.abs(wet).max())
    return (wet * (peak / wet_peak if wet_peak > 0 else 0.0)).astype(np.float32)


def _telephone(audio: np.ndarray, sampling_rate: int) -> np.ndarray:
    """The narrow-band phone channel: 8 kHz, 300-3,400 Hz, 8-bit mu-law, then back to `sampling_rate`."""
    phone = resample_audio(audio, sampling_rate, _PHONE_RATE)
    if phone.size:
        spectrum = np.fft.rfft(phone)
        frequencies = np.fft.rfftfreq(phone.size, 1 / _PHONE_RATE)
        spectrum[(frequencies < _PHONE_BAND[0]) | (frequencies > _PHONE_BAND[1])] = 0
        phone = np.clip(np.fft.irfft(spectrum, phone.size), -1.0, 1.0)
        coded = np.sign(phone) * np.log1p(_MU * np.abs(phone)) / np.log1p(_MU)
        coded = np.round((coded + 1) * 127.5) / 127.5 - 1  # 256 levels
        phone = np.sign(coded) * np.expm1(np.abs(coded) * np.log1p(_MU)) / _MU
    return resample_audio(phone.astype(np.float32), _PHONE_RATE, sampling_rate)

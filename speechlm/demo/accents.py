"""Simulated accents for the demo's training sentences: the same espeak-ng voice with some of its phonemes rewritten.

Why: most of the demo's misheard held-out clips are in an accent training never had (`render.voice_group`), and
espeak-ng has only seven English accents. A real accent is a consistent set of sound changes, so a simulated one is
a random subset of processes found across many varieties of English (th-stopping and th-fronting, h-dropping, final
devoicing, cluster reduction, vowel mergers), applied to every word of one clip. The phonemes come from espeak-ng
itself (`-x --sep`), in its own mnemonics; the rewritten string is spoken back with the same voice (`[[...]]`).
"""

from __future__ import annotations

import random
import subprocess

# Each process rewrites phonemes (espeak-ng's English mnemonics) wherever they occur; "final" ones only at the end of
# a word, "cluster" ones only at the end of a word after another consonant. An empty target deletes the phoneme.
PROCESSES: dict[str, dict[str, str]] = {
    "th-stopping": {"T": "t", "D": "d"},
    "th-fronting": {"T": "f", "D": "v"},
    "th-alveolar": {"T": "s", "D": "z"},
    "h-dropping": {"h": ""},
    "v-to-w": {"v": "w"},
    "kit-fleece": {"I": "i:", "I2": "i:"},
    "foot-goose": {"U": "u:"},
    "strut-foot": {"V": "U"},
    "lot-thought": {"0": "O:", "A:": "O:"},
}
FINAL_PROCESSES: dict[str, dict[str, str]] = {
    "final-devoicing": {"b": "p", "d": "t", "g": "k", "v": "f", "z": "s", "Z": "S", "dZ": "tS"},
}
CLUSTER_PROCESSES: dict[str, dict[str, str]] = {
    "cluster-reduction": {"t": "", "d": ""},
}
ALL_PROCESSES = (*PROCESSES, *FINAL_PROCESSES, *CLUSTER_PROCESSES)
ACCENT_PROCESS_SHARE = 0.3  # each process's chance to be part of one simulated accent (about three of eleven)
STRESS = "',"
CONSONANTS = frozenset("p b t d k g f v T D s z S Z h m n N l r w j tS dZ t# d# r- l/".split())


def sample_accent(rng: random.Random, share: float) -> tuple[str, ...]:
    """Each process on with probability `share`, in a fixed order (the first one that rewrites a phoneme wins)."""
    return tuple(name for name in ALL_PROCESSES if rng.random() < share)


def _rewrite_word(phonemes: list[str], accent: tuple[str, ...]) -> list[str]:
    out, carried = [], ""  # the stress of a deleted phoneme, passed on to the next one
    for i, token in enumerate(phonemes):
        phoneme = token.lstrip(STRESS)
        stress = carried or token[: len(token) - len(phoneme)]
        carried = ""
        final = i == len(phonemes) - 1
        after_consonant = i > 0 and phonemes[i - 1].lstrip(STRESS) in CONSONANTS
        for name in accent:
            table = (PROCESSES.get(name) or (FINAL_PROCESSES.get(name) if final else None)
                     or (CLUSTER_PROCESSES.get(name) if final and after_consonant else None) or {})
            if phoneme in table:
                phoneme = table[phoneme]
                break
        if phoneme:
            out.append(stress + phoneme)
        else:
            carried = stress
    return out


def rewrite(phonemes: str, accent: tuple[str, ...]) -> str:
    """`phonemes` as espeak-ng writes them with `-x --sep=.` (words apart by spaces, phonemes by dots) with the
    accent's processes applied, joined back into the form espeak-ng reads between `[[` and `]]`."""
    return " ".join("".join(_rewrite_word(word.split("."), accent)) for word in phonemes.split())


def accented_phonemes(text: str, voice: str, accent: tuple[str, ...]) -> str:
    """The `[[...]]` input that makes `voice` say `text` with `accent` (its own phonemes, rewritten)."""
    done = subprocess.run(["espeak-ng", "-q", "-v", voice, "-x", "--sep=."], input=text.encode(),
                          capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"espeak-ng -x failed for {voice!r}: {done.stderr.decode(errors='replace')[-500:]}")
    return f"[[{rewrite(done.stdout.decode(), accent)}]]"

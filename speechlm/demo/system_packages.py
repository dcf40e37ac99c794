"""The Debian packages the demo corpus is made from: where their files are, which are missing, and apt-get.

`speechlm demo` checks them before building anything (`check_system_packages`: the error names the exact install
command) and, with `--install-system-packages` as root, installs the free ones (`ensure_system_packages`); the
non-free ones (UQM voice acting, Pico) come from `scripts/fetch_nonfree.sh`, which `scripts/setup.sh` runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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


def asterisk_sound_dir() -> Path | None:
    return next((d for d in ASTERISK_SOUND_DIRS if (d / "activated.wav").is_file()), None)


def fortune_files() -> list[Path]:
    if not FORTUNES_DIR.is_dir():
        return []
    return sorted(p for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.suffix)


def uqm_is_available() -> bool:
    from .uqm import is_available

    return is_available()


def _package_checks(corpus: str, real_speech: bool = False) -> dict[str, Callable[[], bool]]:
    checks: dict[str, Callable[[], bool]] = {
        "espeak-ng": lambda: shutil.which("espeak-ng") is not None,
        "asterisk-core-sounds-en-wav": lambda: asterisk_sound_dir() is not None,
        "asterisk-core-sounds-en": lambda: ASTERISK_TRANSCRIPTS.is_file(),
        "pocketsphinx-testdata": lambda: (LIBRIVOX_DIR / "transcription").is_file(),
    }
    if corpus in ("fortunes", "mixed"):
        checks["fortunes"] = lambda: bool(fortune_files())
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

"""The Debian packages behind the demo corpus (speechlm/demo/system_packages.py): the missing-package error names
the install command, and apt-get runs as root, waiting out a held dpkg lock."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from speechlm.demo import corpus as c
from speechlm.demo import system_packages as sp


@pytest.fixture
def nothing_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sp.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(sp, "ASTERISK_TRANSCRIPTS", tmp_path / "nowhere.txt.gz")


def test_corpus_build_stops_first_with_the_install_command(nothing_installed: None, tmp_path: Path) -> None:
    with pytest.raises(sp.MissingSystemPackage, match=r"apt-get install -y espeak-ng asterisk-core-sounds-en\b"):
        c.build_demo_corpus(tmp_path / "corpus", n_train=2, n_test=1, progress=False)
    assert not (tmp_path / "corpus").exists() or not any((tmp_path / "corpus").iterdir())


def test_without_install_permission_the_error_names_the_command(nothing_installed: None) -> None:
    with pytest.raises(sp.MissingSystemPackage, match="apt-get install -y espeak-ng"):
        sp.ensure_system_packages(install=False)


def test_ensure_system_packages_installs_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = [["espeak-ng", "fortunes"], []]  # before, then after installing
    calls: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(command)
        locked = command[1] == "install" and len(calls) == 2  # the first install meets a held dpkg lock
        return subprocess.CompletedProcess(command, 100 if locked else 0, "", "Could not get lock" if locked else "")

    monkeypatch.setattr(sp, "missing_system_packages", lambda corpus="structured", real_speech=False: missing.pop(0))
    monkeypatch.setattr(sp, "_is_root", lambda: True)
    monkeypatch.setattr(sp.subprocess, "run", fake_run)
    monkeypatch.setattr(sp.time, "sleep", lambda seconds: None)
    sp.ensure_system_packages(install=True, corpus="mixed")
    install = ["apt-get", "install", "-y", "espeak-ng", "fortunes"]
    assert calls == [["apt-get", "update"], install, install]

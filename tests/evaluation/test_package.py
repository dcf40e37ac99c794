"""The package surface: every name `from speechlm.evaluation import X` offered before the split still resolves, and
the evaluation modules' own imports stay light (no torch, transformers or jiwer at import time)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import speechlm.evaluation

ROOT = Path(__file__).resolve().parents[2]


def test_every_name_resolves_from_the_package_to_its_module():
    for name, module in speechlm.evaluation._WHERE.items():
        assert getattr(speechlm.evaluation, name) is getattr(importlib.import_module(module), name)
    assert set(speechlm.evaluation.__all__) <= set(dir(speechlm.evaluation))


def test_modules_do_not_import_torch():
    # speechlm/__init__ pulls in transformers, so load the modules under a bare package of their own.
    code = (
        "import sys, types\n"
        f"package = types.ModuleType('speechlm'); package.__path__ = [{str(ROOT / 'speechlm')!r}]\n"
        "sys.modules['speechlm'] = package\n"
        "import speechlm.audio\n"
        "from speechlm.evaluation import cli, evaluate, metrics, normalizers, outputs, word_error_rate\n"
        "heavy = [m for m in ('torch', 'transformers', 'jiwer') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""The one `speechlm` entry point (speechlm/cli.py): every subcommand listed, each module imported only when used."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from speechlm.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand_with_its_summary(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the summaries
    for name, (_, summary) in SUBCOMMANDS.items():
        assert f" {name} " in shown and " ".join(summary.split()) in shown, name


def test_an_unknown_subcommand_is_exit_code_2_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["transcibe", "clip.wav"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'transcibe'" in error and "transcribe" in error


def test_a_subcommand_imports_its_own_module_and_no_other():
    """So that `speechlm CMD --help` stays fast and a broken optional dependency only affects its own subcommand."""
    code = """
import contextlib, io, json, sys
from speechlm.cli import SUBCOMMANDS, main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["convert", "--help"])
print(json.dumps(sorted({m for m, _ in SUBCOMMANDS.values()} & set(sys.modules))))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == ["speechlm.converters.cli"]

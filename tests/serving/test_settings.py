"""The server's settings (speechlm/serving/settings.py): every field has a `speechlm serve` flag defaulting to it."""

from __future__ import annotations

import argparse
import dataclasses
import functools

import pytest

from speechlm.cli_options import non_negative_integer, unit_interval
from speechlm.serving.app import add_serve_arguments, settings_from_args
from speechlm.serving.settings import ServerSettings

FIELDS = [field.name for field in dataclasses.fields(ServerSettings)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser


def _other_value(action: argparse.Action) -> list[str]:
    """Arguments that give `action` a value other than its default."""
    flag = action.option_strings[-1]
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, next(str(choice) for choice in action.choices if choice != action.default)]
    if action.type in (int, float, non_negative_integer):
        return [flag, str((action.default or 1) * 3)]
    if action.type is unit_interval:
        return [flag, "0.5" if action.default != 0.5 else "0.25"]
    return [flag, "https://other.example" if isinstance(action, argparse._AppendAction) else "other"]


@functools.cache
def _fields_each_flag_reaches() -> frozenset[str]:
    parser = _parser()
    base = dataclasses.asdict(settings_from_args(parser.parse_args(["--model", "/models/tiny"])))
    reached = set()
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "model"):
            continue
        changed = dataclasses.asdict(settings_from_args(parser.parse_args(["--model", "/models/tiny",
                                                                            *_other_value(action)])))
        reached |= {name for name in FIELDS if changed[name] != base[name]}
    return frozenset(reached)


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_has_a_serve_flag(field):
    assert field in _fields_each_flag_reaches()


def test_without_flags_serve_uses_the_settings_defaults(monkeypatch):
    monkeypatch.delenv("SPEECHLM_API_KEY", raising=False)
    parsed = settings_from_args(_parser().parse_args(["--model", "/models/tiny"]))
    assert parsed == ServerSettings(model_name="tiny")  # the model's folder name is the id in /v1/models

"""The package surface: every name `from speechlm.data import X` offered before the split still resolves."""

from __future__ import annotations

import importlib

import speechlm.data


def test_every_name_resolves_from_the_package_to_its_module():
    for name, module in speechlm.data._WHERE.items():
        assert getattr(speechlm.data, name) is getattr(importlib.import_module(module), name)
    assert set(speechlm.data.__all__) <= set(dir(speechlm.data))

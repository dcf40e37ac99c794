"""Lazy package re-exports (speechlm/lazy_exports.py), on real standard-library modules and on speechlm.inference."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from speechlm.lazy_exports import lazy_exports


def _package():
    namespace = {"__name__": "pkg", "LOCAL": 1}
    where, getattr_, dir_ = lazy_exports("pkg", namespace, {"json": ("dumps", "loads"), "math": ("pi",)})
    return namespace, where, getattr_, dir_


def test_every_name_resolves_to_its_home_modules_object_and_is_kept():
    namespace, where, getattr_, _ = _package()
    assert where == {"dumps": "json", "loads": "json", "pi": "math"}
    assert getattr_("dumps") is json.dumps and getattr_("pi") == math.pi
    assert namespace["dumps"] is json.dumps  # later look-ups are plain attribute reads
    assert "loads" not in namespace  # not resolved until asked for


def test_dir_lists_the_exports_beside_the_packages_own_names():
    _, _, _, dir_ = _package()
    assert dir_() == ["LOCAL", "__name__", "dumps", "loads", "pi"]


def test_an_unknown_name_is_an_attribute_error_naming_the_package():
    _, _, getattr_, _ = _package()
    with pytest.raises(AttributeError, match="module 'pkg' has no attribute 'dump'"):
        getattr_("dump")


def test_importing_a_package_imports_no_home_module_until_a_name_is_used():
    code = """
import json, os, sys
os.environ["SPEECHLM_DEFER_REGISTRATION"] = "1"
import speechlm.inference as inference
before = sorted(m for m in sys.modules if m.startswith("speechlm.inference."))
inference.format_timestamp
after = sorted(m for m in sys.modules if m.startswith("speechlm.inference."))
print(json.dumps([before, after, "torch" in sys.modules, all(n in dir(inference) for n in inference.__all__)]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, torch_imported, listed = json.loads(result.stdout)
    assert before == [] and after == ["speechlm.inference.formats"]
    assert not torch_imported and listed

"""Lazy re-exports for a package `__init__`: `from package import name` resolves `name` in its home module on first
use, so that importing the package (and building a CLI parser) imports none of the heavy modules behind it.

    _WHERE, __getattr__, __dir__ = lazy_exports(__name__, globals(), {"package.module": ("name", ...), ...})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any


def lazy_exports(
    package: str, namespace: MutableMapping[str, Any], homes: Mapping[str, Sequence[str]]
) -> tuple[dict[str, str], Callable[[str], Any], Callable[[], list[str]]]:
    """(name -> home module, the module `__getattr__`, the module `__dir__`) for `package`, whose globals are
    `namespace`; a resolved name is stored there, so later look-ups are plain attribute reads."""
    where = {name: module for module, names in homes.items() for name in names}

    def resolve(name: str) -> Any:
        home = where.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = getattr(importlib.import_module(home), name)
        return namespace[name]

    return where, resolve, lambda: sorted(set(namespace) | set(where))

"""SpeechLM: any Hugging Face audio encoder + any decoder-only LLM = one speech language model.

Importing the package registers SpeechLM with transformers' `AutoConfig`, `AutoModel`, `AutoModelForMultimodalLM`
and `AutoProcessor`, so saved folders load with `trust_remote_code=False` once `speechlm` is imported. Each class
registers itself in the module that defines it; importing the package imports those modules.

The `speechlm` command is the one exception: its entry point (`speechlm_cli`) imports the package with
`SPEECHLM_DEFER_REGISTRATION=1`, so that `speechlm --help` and `speechlm CMD --help` never import torch (registration
costs the torch + transformers import, seconds). A command that loads a model imports the defining modules, which
register then. The names below resolve on first use either way (PEP 562).
"""

from __future__ import annotations

import importlib
import os

DEFER_REGISTRATION_ENV = "SPEECHLM_DEFER_REGISTRATION"
_HOMES = {
    "SpeechLMConfig": "speechlm.configuration",
    "SpeechLMModel": "speechlm.modeling",
    "create_speech_lm_model": "speechlm.factory",
    "SpeechLMProcessor": "speechlm.processing",
}


def register_auto_classes() -> None:
    """Register SpeechLM with transformers' Auto classes (idempotent): import the modules that register their class."""
    for module in ("speechlm.configuration", "speechlm.modeling", "speechlm.processing"):
        importlib.import_module(module)


def __getattr__(name: str):
    """`speechlm.SpeechLMModel` and friends, imported from their module on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module 'speechlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


if os.environ.get(DEFER_REGISTRATION_ENV) != "1":
    register_auto_classes()

__version__ = "0.1.0"
__all__ = ["SpeechLMConfig", "SpeechLMModel", "create_speech_lm_model", "SpeechLMProcessor", "register_auto_classes"]

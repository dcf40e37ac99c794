"""The `speechlm` console command: `speechlm.cli` imported without registering the Auto classes first.

`import speechlm` registers SpeechLM with transformers (which imports torch: seconds), and every `speechlm.*` import
runs the package's `__init__` first, so an entry point inside the package cannot avoid it. This one sets
`SPEECHLM_DEFER_REGISTRATION` only while it imports the package, so `speechlm --help` and `speechlm CMD --help` stay
fast and nothing else (child processes, later imports) sees the variable; a command that loads a model still
registers, in the modules that define the classes.
"""

from __future__ import annotations

import os

_ENV = "SPEECHLM_DEFER_REGISTRATION"  # speechlm.DEFER_REGISTRATION_ENV, named here without importing the package


def main(argv: list[str] | None = None) -> int:
    """Run the `speechlm` command line (`speechlm.cli.main`)."""
    previous = os.environ.get(_ENV)
    os.environ[_ENV] = "1"
    try:
        from speechlm.cli import main as run
    finally:
        if previous is None:
            del os.environ[_ENV]
        else:
            os.environ[_ENV] = previous
    return run(argv)

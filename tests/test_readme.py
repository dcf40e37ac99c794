"""The README's quick start runs as pasted (with tiny local models in place of the hub ids, which need a network)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import soundfile as sf

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_quick_start_runs_as_pasted(model_dirs, tmp_path, monkeypatch):
    code = quick_start()
    for hub_id, family in (("facebook/mms-300m", ("encoder", "wav2vec2-layer")),
                           ("Qwen/Qwen3-0.6B", ("decoder", "qwen3"))):
        assert f'"{hub_id}"' in code
        code = code.replace(f'"{hub_id}"', repr(str(model_dirs(*family))))
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "hello.wav", rng.normal(0, 0.1, 16_000).astype(np.float32), 16_000)
    sf.write(tmp_path / "meeting.flac", rng.normal(0, 0.1, 24_000).astype(np.float32), 24_000)  # resampled
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "small" / "config.json").is_file()
    assert np.isfinite(namespace["loss"].item())
    assert namespace["batch"]["input_values"].shape[0] == 2  # both files, one at 24 kHz resampled to 16 kHz
    assert type(namespace["model"]).__name__ == "SpeechLMModel"

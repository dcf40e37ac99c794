"""SpeechLMConfig as transformers sees it: architectures, auto_map, AutoConfig/AutoModel with and without
`import speechlm`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

from speechlm import SpeechLMConfig, SpeechLMModel
from speechlm.configuration import AUTO_MAP

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("trainable_only", [False, True])
def test_saved_config_names_its_architecture_and_auto_map(build, tmp_path, trainable_only):
    _, model = build("whisper", "qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path, trainable_only=trainable_only)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["SpeechLMModel"] and config["auto_map"] == AUTO_MAP
    module = AUTO_MAP["AutoModel"].split(".")[0]
    assert (tmp_path / f"{module}.py").is_file()


def test_after_import_auto_classes_load_a_saved_folder_without_remote_code(build, clips, tmp_path):
    processor, model = build("wav2vec2-layer", "qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=False)
    assert type(config) is SpeechLMConfig and config.audio_config.model_type == "wav2vec2"
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=False)
    assert type(loaded) is SpeechLMModel
    batch = processor(clips, text=["a", "b", "c"])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_without_import_transformers_asks_for_remote_code_which_loads_the_installed_speechlm(build, tmp_path):
    """A fresh interpreter that never imports speechlm: transformers names `trust_remote_code` (not "update
    transformers"), and with it the saved two-line module loads the installed classes."""
    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoModel, AutoProcessor
        try:
            AutoModel.from_pretrained({str(tmp_path / "model")!r})
        except ValueError as error:
            print("ERROR:", error)
        assert "speechlm" not in sys.modules
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        print("LOADED:", type(model).__module__, type(model).__name__, type(processor).__name__)
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ERROR:" in done.stdout and "trust_remote_code=True" in done.stdout
    assert "LOADED: speechlm.modeling SpeechLMModel SpeechLMProcessor" in done.stdout


def test_registration_maps_the_model_type_to_our_classes():
    from transformers import AutoProcessor
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING, MODEL_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    from speechlm import SpeechLMProcessor

    assert CONFIG_MAPPING["speechlm"] is SpeechLMConfig and MODEL_MAPPING[SpeechLMConfig] is SpeechLMModel
    assert PROCESSOR_MAPPING[SpeechLMConfig] is SpeechLMProcessor and AutoProcessor is not None
    assert MODEL_FOR_MULTIMODAL_LM_MAPPING[SpeechLMConfig] is SpeechLMModel  # what the any-to-any pipeline loads


def test_a_negative_projector_layer_count_is_refused_by_name():
    with pytest.raises(ValueError, match="projector_layers"):
        SpeechLMConfig(projector_layers=-1)

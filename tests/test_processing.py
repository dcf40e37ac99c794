"""SpeechLMProcessor as a transformers processor: AutoProcessor, save/load round trips, the older folder format,
push_to_hub."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, ProcessorMixin

from speechlm import SpeechLMProcessor
from speechlm.processing import PROCESSOR_CONFIG_NAME


def _same_batches(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_auto_processor_returns_the_speechlm_processor_with_its_settings(build, clips, tmp_path):
    processor, model = build("whisper", "qwen2", layout="placeholder")
    processor = SpeechLMProcessor(processor.feature_extractor, processor.tokenizer, audio_layout="placeholder",
                                  prompt="say it", use_chat_template=True)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, SpeechLMProcessor) and isinstance(loaded, ProcessorMixin)
    assert (loaded.audio_layout, loaded.prompt, loaded.use_chat_template) == ("placeholder", "say it", True)
    _same_batches(loaded(clips, text=["a", "b", "c"]), processor(clips, text=["a", "b", "c"]))
    chat = [{"role": "user", "content": [{"type": "audio", "audio": clips[0]}, {"type": "text", "text": "hi"}]}]
    _same_batches(loaded.apply_chat_template(chat), processor.apply_chat_template(chat))


def test_from_pretrained_overrides_saved_settings(build, tmp_path):
    processor, _ = build("wav2vec2-layer", "qwen2")
    processor.save_pretrained(tmp_path)
    assert SpeechLMProcessor.from_pretrained(tmp_path).prompt == "transcribe"
    assert SpeechLMProcessor.from_pretrained(tmp_path, prompt="other").prompt == "other"


def test_folders_of_the_older_format_still_load(build, clips, tmp_path):
    """Before the ProcessorMixin: preprocessor_config.json + tokenizer + speechlm_processor.json, no
    processor_config.json."""
    processor, model = build("whisper", "qwen2")
    processor.feature_extractor.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)
    (tmp_path / PROCESSOR_CONFIG_NAME).write_text(json.dumps(
        {"audio_layout": "prefix", "prompt": "old prompt", "use_chat_template": False}))
    for loader in (SpeechLMProcessor, AutoProcessor):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, SpeechLMProcessor) and loaded.prompt == "old prompt"
        _same_batches(loaded(clips), SpeechLMProcessor(processor.feature_extractor, processor.tokenizer,
                                                       prompt="old prompt")(clips))


def test_push_to_hub_uploads_a_loadable_processor(build, tmp_path, monkeypatch):
    from transformers.utils import hub

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    def upload(self, folder, repo_id, **kwargs):
        import shutil

        shutil.copytree(folder, tmp_path / "uploaded")

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(SpeechLMProcessor, "_upload_modified_files", upload)
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: type("Card", (), {"save": print})())
    processor, _ = build("whisper", "qwen2")
    processor.push_to_hub("me/speechlm")
    loaded = SpeechLMProcessor.from_pretrained(tmp_path / "uploaded")
    assert loaded.prompt == "transcribe" and len(loaded.tokenizer) == len(processor.tokenizer)


def test_an_expanding_processor_keeps_its_arithmetic_through_save_and_load(build, clips, tmp_path):
    processor, model = build("whisper", "qwen2", layout="placeholder")
    processor = processor.expanding_for(model.config)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.audio_tokens == processor.audio_tokens
    _same_batches(loaded(clips), processor(clips))


def test_chat_inputs_expand_like_plain_inputs(build, clips):
    processor, model = build("whisper", "qwen2", layout="placeholder")
    processor = processor.expanding_for(model.config)
    chat = [{"role": "user", "content": [{"type": "audio", "audio": clips[0]}, {"type": "text", "text": "say it"}]}]
    _same_batches(processor.apply_chat_template(chat), processor([clips[0]], prompt="say it"))


def test_expansion_needs_the_placeholder_layout(build):
    processor, model = build("whisper", "qwen2")
    with pytest.raises(ValueError, match="placeholder"):
        SpeechLMProcessor(processor.feature_extractor, processor.tokenizer, audio_layout="prefix",
                          audio_tokens={"convs": [], "stack_factor": 1})

"""Saved folders in transformers' and peft's own formats: trainable-only checkpoints rebuilt from recorded hub ids,
base model overrides, LoRA adapters peft can read, the model card and push_to_hub."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

from speechlm import SpeechLMModel, SpeechLMProcessor, create_speech_lm_model
from speechlm.checkpoint_files import lora_state_to_peft
from speechlm.factory import BASE_MODELS_ROOT_ENV, LORA_ADAPTER_DIR, TRAINABLE_WEIGHTS_NAME
from tests.conftest import make_clips

SHA = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, so the hub cache is read by revision


def _model(encoder_dir, decoder_dir, lora: bool = False, **kwargs):
    feature_extractor, tokenizer, model = create_speech_lm_model(str(encoder_dir), str(decoder_dir),
                                                                 projection_hidden_size=32, **kwargs)
    torch.manual_seed(0)
    for param in [*model.multi_modal_projector.parameters(), model.audio_start, model.audio_end]:
        param.data.normal_(0, 0.5)  # a trained-looking projector: audio drives the output
    if lora:
        model.add_lora(r=4, alpha=8, dropout=0.0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.2)  # fresh adapters are zero and would change nothing
    return SpeechLMProcessor(feature_extractor, tokenizer, prompt="transcribe"), model.eval()


def _logits(processor, model):
    batch = processor(make_clips(), text=["call mom", "play", "set an alarm"])
    with torch.no_grad():
        return model(**batch).logits


def _hub_cache(root, repo_id: str, source) -> str:
    """A Hugging Face cache entry for `repo_id` holding `source`'s files: the hub, simulated offline."""
    entry = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, entry / "snapshots" / SHA)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(SHA)
    return str(entry / "snapshots" / SHA)


@pytest.fixture
def cached_bases(model_dirs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: no network here
    cache = tmp_path / "hub"
    encoder = _hub_cache(cache, "tiny/whisper-encoder", model_dirs("encoder", "whisper"))
    decoder = _hub_cache(cache, "tiny/qwen2-decoder", model_dirs("decoder", "qwen2"))
    return cache, encoder, decoder


@pytest.mark.parametrize("trainable_only", [True, False])
def test_saved_config_records_hub_ids_and_revision_not_local_paths(cached_bases, tmp_path, trainable_only):
    cache, encoder, decoder = cached_bases
    _, model = _model(encoder, decoder)
    model.save_pretrained(tmp_path / "small", trainable_only=trainable_only)
    assert model.config.encoder_name_or_path == encoder  # the model in memory keeps what it was built from
    text = (tmp_path / "small" / "config.json").read_text()
    config = json.loads(text)
    assert config["encoder_name_or_path"] == "tiny/whisper-encoder"
    assert config["decoder_name_or_path"] == "tiny/qwen2-decoder"
    assert config["encoder_loading_kwargs"]["revision"] == config["decoder_loading_kwargs"]["revision"] == SHA
    assert str(tmp_path) not in text  # nothing machine-specific: the folder loads elsewhere


def test_hub_style_trainable_only_checkpoint_rebuilds_identical_logits_through_auto_model(cached_bases, tmp_path):
    cache, encoder, decoder = cached_bases
    processor, model = _model(encoder, decoder)
    expected = _logits(processor, model)
    model.save_pretrained(tmp_path / "small", trainable_only=True)
    processor.save_pretrained(tmp_path / "small")
    _hub_cache(cache, "me/speechlm-small", tmp_path / "small")  # the checkpoint itself "pushed" to the hub

    loaded = AutoModel.from_pretrained("me/speechlm-small", cache_dir=str(cache), local_files_only=True)
    assert isinstance(loaded, SpeechLMModel) and not loaded.config.trainable_only
    assert torch.equal(_logits(processor, loaded), expected)
    from_folder = AutoModel.from_pretrained(tmp_path / "small", cache_dir=str(cache), local_files_only=True)
    assert torch.equal(_logits(processor, from_folder), expected)
    hub_processor = AutoProcessor.from_pretrained("me/speechlm-small", cache_dir=str(cache), local_files_only=True)
    assert isinstance(hub_processor, SpeechLMProcessor) and hub_processor.prompt == "transcribe"


def test_base_models_can_be_overridden_and_a_missing_one_is_named(model_dirs, tmp_path):
    encoder = shutil.copytree(model_dirs("encoder", "whisper"), tmp_path / "bases" / "encoder")
    decoder = shutil.copytree(model_dirs("decoder", "qwen2"), tmp_path / "bases" / "decoder")
    processor, model = _model(encoder, decoder)
    expected = _logits(processor, model)
    model.save_pretrained(tmp_path / "small", trainable_only=True)
    moved = shutil.move(tmp_path / "bases", tmp_path / "elsewhere")  # "another machine": the recorded paths are gone

    with pytest.raises(OSError, match=r"built on the encoder .*bases/encoder.*Pass encoder="):
        SpeechLMModel.from_pretrained(tmp_path / "small")
    with pytest.raises(OSError, match=r"built on the decoder .*bases/decoder.*Pass decoder="):
        AutoModel.from_pretrained(tmp_path / "small", encoder=str(moved / "encoder"))
    for loader in (SpeechLMModel, AutoModel):
        loaded = loader.from_pretrained(tmp_path / "small", encoder=str(moved / "encoder"),
                                        decoder=str(moved / "decoder"))
        assert torch.equal(_logits(processor, loaded), expected)
    loaded.save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="full checkpoint"):
        SpeechLMModel.from_pretrained(tmp_path / "full", encoder=str(moved / "encoder"))


def test_base_models_under_the_documented_root_are_recorded_relative_to_it(model_dirs, tmp_path, monkeypatch):
    root = tmp_path / "bases"
    encoder = shutil.copytree(model_dirs("encoder", "whisper"), root / "whisper")
    decoder = shutil.copytree(model_dirs("decoder", "qwen2"), root / "qwen2")
    processor, model = _model(encoder, decoder)
    expected = _logits(processor, model)
    monkeypatch.setenv(BASE_MODELS_ROOT_ENV, str(root))
    model.save_pretrained(tmp_path / "small", trainable_only=True)
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert (config["encoder_name_or_path"], config["decoder_name_or_path"]) == ("whisper", "qwen2")

    monkeypatch.setenv(BASE_MODELS_ROOT_ENV, str(shutil.move(root, tmp_path / "other-root")))
    assert torch.equal(_logits(processor, SpeechLMModel.from_pretrained(tmp_path / "small")), expected)


@pytest.mark.parametrize("trainable_only", [True, False])
def test_lora_adapters_are_saved_in_peft_format_and_restored(model_dirs, tmp_path, trainable_only):
    from peft import PeftModel

    processor, model = _model(model_dirs("encoder", "whisper"), model_dirs("decoder", "qwen2"), lora=True)
    expected = _logits(processor, model)
    model.save_pretrained(tmp_path / "model", trainable_only=trainable_only)
    adapter = tmp_path / "model" / LORA_ADAPTER_DIR
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    if trainable_only:  # one home for the adapters
        assert not any("lora_" in name for name in load_file(tmp_path / "model" / TRAINABLE_WEIGHTS_NAME))

    # peft's own loader reads them onto a plain copy of the same LLM.
    _, plain = _model(model_dirs("encoder", "whisper"), model_dirs("decoder", "qwen2"))
    peft_model = PeftModel.from_pretrained(plain.language_model, str(adapter)).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, model.language_model(input_ids=ids).logits)

    loaded = AutoModel.from_pretrained(tmp_path / "model")
    assert loaded.config.lora["r"] == 4 and torch.equal(_logits(processor, loaded), expected)


@pytest.mark.parametrize("trainable_only", [True, False])
def test_a_given_state_dict_is_what_every_saved_file_holds(model_dirs, tmp_path, trainable_only):
    """transformers' Trainer saves an FSDP- or ZeRO-3-sharded model as `save_pretrained(folder, state_dict=gathered)`:
    the live parameters are shards (reading them failed on a GPU under accelerate's FSDP), so the projector and the
    LoRA adapters must come from the given weights, in every file."""
    _, model = _model(model_dirs("encoder", "whisper"), model_dirs("decoder", "qwen2"), lora=True)
    given = {name: value + 1 if value.is_floating_point() else value for name, value in model.state_dict().items()}
    model.save_pretrained(tmp_path / "model", trainable_only=trainable_only, state_dict=dict(given))  # it is emptied
    loaded = SpeechLMModel.from_pretrained(tmp_path / "model")
    trained = [name for name, param in model.named_parameters() if param.requires_grad]
    assert any("lora_" in name for name in trained) and any("projector" in name for name in trained)
    for name in trained:
        assert torch.equal(loaded.state_dict()[name], given[name]), name
    adapter = load_file(tmp_path / "model" / LORA_ADAPTER_DIR / "adapter_model.safetensors")  # peft's copy too
    lora = {name.removeprefix("language_model."): given[name] for name in trained if "lora_" in name}
    assert all(torch.equal(adapter[key], value) for key, value in lora_state_to_peft(lora).items())


def test_trainable_only_folders_of_the_older_format_still_load_their_lora(model_dirs, tmp_path):
    """Before the peft format, the adapters lived inside trainable.safetensors under the model's own names."""
    processor, model = _model(model_dirs("encoder", "whisper"), model_dirs("decoder", "qwen2"), lora=True)
    expected = _logits(processor, model)
    model.save_pretrained(tmp_path / "old", trainable_only=True)
    shutil.rmtree(tmp_path / "old" / LORA_ADAPTER_DIR)
    state = load_file(tmp_path / "old" / TRAINABLE_WEIGHTS_NAME)
    state.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    save_file(state, tmp_path / "old" / TRAINABLE_WEIGHTS_NAME)
    assert torch.equal(_logits(processor, SpeechLMModel.from_pretrained(tmp_path / "old")), expected)


def test_model_card_names_base_models_pipeline_and_metrics(cached_bases, tmp_path):
    _, encoder, decoder = cached_bases
    _, model = _model(encoder, decoder)
    model.save_pretrained(tmp_path / "small", trainable_only=True, metrics={"wer": 0.125})
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "small" / "README.md")
    assert card.data.base_model == ["tiny/whisper-encoder", "tiny/qwen2-decoder"]
    assert card.data.pipeline_tag == "automatic-speech-recognition" and card.data.library_name == "transformers"
    assert card.data.metrics == ["wer"] and "| wer | 0.125 |" in card.text

    (tmp_path / "small" / "README.md").write_text("my own card")  # a card the user wrote is never overwritten
    model.save_pretrained(tmp_path / "small", trainable_only=True)
    assert (tmp_path / "small" / "README.md").read_text() == "my own card"


def test_push_to_hub_uploads_the_saved_folder_with_its_card(model_dirs, monkeypatch):
    from transformers.utils import hub

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    uploaded = {}

    def upload(self, folder, repo_id, **kwargs):
        uploaded.update(repo_id=repo_id, files={p.name: p.read_text() if p.suffix in (".md", ".json") else None
                                                for p in __import__("pathlib").Path(folder).iterdir()})

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(SpeechLMModel, "_upload_modified_files", upload)
    _, model = _model(model_dirs("encoder", "whisper"), model_dirs("decoder", "qwen2"))
    model.push_to_hub("me/speechlm", trainable_only=True, metrics={"wer": 0.5})
    assert uploaded["repo_id"] == "me/speechlm"
    assert {"config.json", TRAINABLE_WEIGHTS_NAME, "README.md", "modeling_speechlm.py"} <= set(uploaded["files"])
    assert "| wer | 0.5 |" in uploaded["files"]["README.md"]

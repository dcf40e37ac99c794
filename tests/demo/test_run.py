"""The demo's parts (speechlm/demo/run.py), without training."""

from __future__ import annotations

from speechlm.demo.settings import DemoSettings


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

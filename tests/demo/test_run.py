"""The demo's parts and decoding (speechlm/demo/run.py, speechlm/demo/evaluate.py), without training."""

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


def test_decoding_cap_follows_the_longest_clip_of_each_batch(monkeypatch):
    import numpy as np

    import speechlm.inference
    from speechlm.demo.run import transcribe_capped

    caps = []

    def spy(model, processor, audio, batch_size, max_new_tokens, **kwargs):
        caps.append(max_new_tokens)
        return [f"clip of {len(a)} samples" for a in audio]

    monkeypatch.setattr(speechlm.inference, "transcribe_arrays", spy)
    audio = [np.zeros(160_000), np.zeros(16_000)]  # 10 s, then 1 s: decoded shortest first
    assert transcribe_capped(None, None, audio, max_new_tokens=96, batch_size=1) == [
        "clip of 160000 samples", "clip of 16000 samples"]
    assert caps == [13, 58]  # 5 tokens/s + 8
    transcribe_capped(None, None, audio, max_new_tokens=20, batch_size=2)
    assert caps[-1] == 20  # never above the caller's cap

"""What training does to the model (speechlm.adaptation): freezing, train/eval modes, LoRA adapters."""

from __future__ import annotations

import pytest
import torch

from speechlm.adaptation import LORA_DEFAULTS, linear_module_names

FREEZERS = {
    "freeze_encoder": lambda m: m.freeze_encoder(),
    "freeze_decoder": lambda m: m.freeze_decoder(),
    "freeze_decoder_except_lm_head": lambda m: m.freeze_decoder_except_lm_head(),
    "freeze_projection": lambda m: m.freeze_projection(),
    "encoder_and_decoder": lambda m: (m.freeze_encoder(), m.freeze_decoder()),
}


@pytest.mark.parametrize("freezer", list(FREEZERS))
def test_gradients_reach_exactly_the_unfrozen_parameters(build, clips, freezer):
    processor, model = build("wav2vec2-layer", "qwen2", dtype=torch.float32)
    FREEZERS[freezer](model)
    model.train()
    model(**processor(clips, text=["set an alarm", "call mom", "play"])).loss.backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # Everything trainable gets a gradient, except encoder parameters that a forward pass never uses (the
    # masked_spec_embed for SpecAugment, the LM head/bias rows of unused classes are still used).
    assert with_grad <= trainable
    unused = {n for n in trainable - with_grad if "masked_spec_embed" in n or n.endswith("lm_head.bias")}
    assert trainable - with_grad == unused
    projector = {n for n in trainable if n.startswith(("multi_modal_projector", "audio_start", "audio_end"))}
    encoder = {n for n in trainable if n.startswith("audio_tower")}
    decoder = {n for n in trainable if n.startswith("language_model")}
    assert bool(projector) == (freezer != "freeze_projection")
    assert bool(encoder) == (freezer in ("freeze_decoder", "freeze_decoder_except_lm_head", "freeze_projection"))
    if freezer == "freeze_decoder_except_lm_head":
        head = model.get_output_embeddings().weight
        assert {n for n, p in model.language_model.named_parameters() if p.requires_grad} and head.requires_grad
        assert all(p is head for n, p in model.language_model.named_parameters() if p.requires_grad)
    else:
        assert bool(decoder) == (freezer in ("freeze_encoder", "freeze_projection"))


def test_unfreeze_restores_training_and_frozen_encoder_stays_in_eval(build):
    _, model = build("wav2vec2-layer", "qwen2")
    model.freeze_encoder()
    model.train()
    assert not model.audio_tower.training and model.multi_modal_projector.training
    model.unfreeze_encoder()
    model.train()
    assert model.audio_tower.training and all(p.requires_grad for p in model.audio_tower.parameters())


@pytest.mark.parametrize("encoder", ["whisper", "wav2vec2-group"])
def test_gradient_checkpointing_with_a_frozen_encoder(build, clips, encoder):
    processor, model = build(encoder, "llama", dtype=torch.float32)
    batch = processor(clips, text=["set an alarm", "call mom", "play"])
    model.freeze_encoder()
    model.train()
    model(**batch).loss.backward()
    reference = model.multi_modal_projector.linear_1.weight.grad.clone()
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(**batch).loss.backward()
    torch.testing.assert_close(model.multi_modal_projector.linear_1.weight.grad, reference)


def test_add_lora_takes_peft_names_beside_the_seed_names(build):
    """`lora_alpha` / `lora_dropout` (peft's and the config's names) and `alpha` / `dropout` set the same thing."""
    settings = []
    for kwargs in ({"alpha": 8, "dropout": 0.1}, {"lora_alpha": 8, "lora_dropout": 0.1}, {"alpha": 8, "lora_alpha": 8,
                                                                                       "lora_dropout": 0.1}):
        _, model = build("wav2vec2-layer", "qwen2")
        model.add_lora(r=2, **kwargs)
        settings.append(model.config.lora)
    assert settings[0] == settings[1] == settings[2]
    assert settings[0]["lora_alpha"] == 8 and settings[0]["lora_dropout"] == 0.1
    _, model = build("wav2vec2-layer", "qwen2")
    with pytest.raises(ValueError, match="lora_alpha=16 and alpha=8 name the same setting"):
        model.add_lora(alpha=8, lora_alpha=16)


def test_lora_targets_every_linear_layer_but_the_head_and_merges_away(build, clips):
    processor, model = build("wav2vec2-layer", "qwen2")
    batch = processor(clips, text=["set an alarm", "call mom", "play"])
    targets = linear_module_names(model.language_model)
    assert "lm_head" not in targets and {"q_proj", "v_proj", "down_proj"} <= set(targets)
    model.add_lora(r=2)
    assert model.config.lora["lora_alpha"] == LORA_DEFAULTS["lora_alpha"]
    assert not any(m.training for m in model.modules())  # the new adapters' dropout follows the eval model
    trainable = {n for n, p in model.language_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        model.add_lora(r=2)
    for name, param in model.language_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)  # peft starts B at zero: make the adapters change the output
    with torch.no_grad():
        adapted = model(**batch).logits
        model.merge_lora()
        merged = model(**batch).logits
    assert model.config.lora is None and not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(merged, adapted)

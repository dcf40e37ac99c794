"""The demo's held-out decoding (speechlm/demo/evaluate.py), without a trained model."""

from __future__ import annotations


def test_decoding_cap_follows_the_longest_clip_of_each_batch(monkeypatch):
    import numpy as np

    import speechlm.inference
    from speechlm.demo.evaluate import transcribe_capped

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

"""The demo's held-out decoding (speechlm/demo/evaluate.py), without a trained model."""

from __future__ import annotations


def test_the_demo_caps_new_tokens_by_clip_length_at_its_rate(monkeypatch):
    # The cap itself is the library's (tests/inference/test_decoding.py); the demo must ask for it, at its rate.
    import speechlm.inference
    from speechlm.demo.evaluate import TOKENS_PER_SECOND, transcribe_capped

    calls = []
    monkeypatch.setattr(speechlm.inference, "transcribe_arrays", lambda *args, **kwargs: calls.append(kwargs) or [])
    transcribe_capped(None, None, [], max_new_tokens=96, batch_size=4)
    assert calls == [{"batch_size": 4, "max_new_tokens": 96, "tokens_per_second": TOKENS_PER_SECOND}]

"""The demo's settings and report (speechlm/demo/run.py), without training."""

from __future__ import annotations

import argparse

from speechlm.demo.run import DemoSettings, add_arguments, settings_from_args, write_report


def parse(*argv: str) -> DemoSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))


def test_every_option_reaches_the_settings():
    assert parse() == DemoSettings()
    settings = parse("--lora-targets", "q_proj,k_proj", "--stack-factor", "8", "--num-beams", "3", "--ctc-weight", "0",
                     "--ctc-minutes", "2", "--lora-learning-rate", "1e-4", "--n-train", "50")
    assert (settings.lora_targets, settings.stack_factor, settings.num_beams) == ("q_proj,k_proj", 8, 3)
    assert (settings.ctc_weight, settings.ctc_minutes) == (0, 2)
    assert (settings.lora_learning_rate, settings.n_train) == (1e-4, 50)


def test_model_key_ignores_evaluation_only_settings():
    base = DemoSettings()
    assert DemoSettings(num_beams=4, eval_limit=5).fingerprint() == base.fingerprint()
    for changed in (DemoSettings(lora_targets="q_proj"), DemoSettings(stack_factor=8), DemoSettings(ctc_weight=0)):
        assert changed.fingerprint() != base.fingerprint()


def test_report_states_loss_and_decoding(tmp_path):
    results = {"test_synthetic": {"n_utterances": 1, "wer": 0.5, "cer": 0.25, "seconds": 1.0,
                                  "rows": [{"id": "a", "ref": "turn on", "hyp": "turn off", "wer": 0.5}]}}
    history = {"loss": [(0.1, 10, 3.0), (1.0, 20, 1.0)], "wer": [(0.5, 15, 0.8)], "steps": 20, "minutes": 1.0}
    text = write_report(tmp_path, DemoSettings(ctc_weight=0.5, num_beams=3), history, results).read_text()
    assert "LLM loss + 0.5 x CTC alignment loss" in text and "beam width 3" in text
    assert "| test_synthetic | 1 | 50.0% | 25.0% | 1 |" in text
    text = write_report(tmp_path, DemoSettings(ctc_weight=0.0), history, results).read_text()
    assert "CTC" not in text and "greedily" in text

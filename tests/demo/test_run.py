"""The demo's settings and report (speechlm/demo/run.py), without training."""

from __future__ import annotations

import argparse

import pytest

from speechlm.demo.report import write_report
from speechlm.demo.run import DemoSettings, add_arguments, settings_from_args


def parse(*argv: str) -> DemoSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))


def test_every_option_reaches_the_settings():
    assert parse() == DemoSettings()
    settings = parse("--lora-targets", "q_proj,k_proj", "--stack-factor", "8", "--num-beams", "3", "--ctc-weight", "0",
                     "--ctc-fraction", "0.25", "--frame-masking", "0.2", "--lora-learning-rate", "1e-4",
                     "--n-train", "50", "--no-ctc-compression", "--real-speech-repeats", "3")
    assert (settings.lora_targets, settings.stack_factor, settings.num_beams) == ("q_proj,k_proj", 8, 3)
    assert (settings.ctc_weight, settings.ctc_fraction, settings.frame_masking) == (0, 0.25, 0.2)
    assert (settings.lora_learning_rate, settings.n_train) == (1e-4, 50)
    assert (settings.ctc_compression, settings.real_speech_repeats) == (False, 3)
    assert parse("--ctc-compression").ctc_compression is True


def test_model_key_ignores_evaluation_only_settings():
    base = DemoSettings()
    assert DemoSettings(num_beams=4, eval_limit=5).fingerprint() == base.fingerprint()
    for changed in (DemoSettings(lora_targets="q_proj"), DemoSettings(stack_factor=8), DemoSettings(ctc_weight=0)):
        assert changed.fingerprint() != base.fingerprint()


def test_report_states_loss_and_decoding(tmp_path):
    results = {"test_synthetic": {"n_utterances": 1, "wer": 0.5, "cer": 0.25, "seconds": 1.0, "insertions": 0,
                                  "rows": [{"id": "a", "ref": "turn on", "hyp": "turn off", "wer": 0.5}]}}
    history = {"loss": [(0.1, 10, 3.0), (1.0, 20, 1.0)], "wer": [(0.5, 15, 0.8)], "steps": 20, "minutes": 1.0}
    text = write_report(tmp_path, DemoSettings(ctc_weight=0.5, num_beams=3), history, results).read_text()
    assert "LLM loss + 0.5 x CTC alignment loss" in text and "beam width 3" in text
    assert "the first 15% of the budget: CTC pre-alignment" in text
    assert "| test_synthetic | 1 | 50.0% | 25.0% | 0 | - | 1 |" in text
    text = write_report(tmp_path, DemoSettings(ctc_weight=0.0, ctc_fraction=0.0), history, results).read_text()
    assert "CTC" not in text and "greedily" in text and "real-speech" not in text
    text = write_report(tmp_path, DemoSettings(ctc_compression=True, real_speech_repeats=3), history,
                        results).read_text()
    assert "CTC-compressed audio" in text and "real-speech clips x3" in text


def test_frame_masking_zeroes_whole_frames_and_channels_only(build):
    """SpecAugment on cached frames: masked frames/channels are all zero, the rest is the input, labels untouched."""
    import torch

    from speechlm.demo.run import FrameCollator

    processor, _ = build("whisper", "llama")
    torch.manual_seed(0)
    items = [{"frames": torch.randn(n, 16).add(5).half(), "text": "turn on the lights"} for n in (40, 25)]
    plain = FrameCollator(processor)(items)
    assert torch.equal(plain["encoder_frames"][0], items[0]["frames"].float())
    masked = FrameCollator(processor, masking=0.3)(items)
    frames, original = masked["encoder_frames"], plain["encoder_frames"]
    zero = frames == 0
    dropped_frames, dropped_channels = zero.all(-1), zero.all(-2)
    assert dropped_frames[0].any() and dropped_channels[0].any()
    assert not dropped_frames[0].all() and not dropped_channels[0].all()
    kept = ~dropped_frames[..., None] & ~dropped_channels[:, None, :]
    assert torch.equal(frames[kept], original[kept])  # whatever is not masked is the input, bit for bit
    assert torch.equal(masked["labels"], plain["labels"]) and torch.equal(masked["encoder_frame_lengths"],
                                                                          plain["encoder_frame_lengths"])


@pytest.mark.parametrize(("option", "value"), [("ctc_fraction", 1.0), ("frame_masking", -0.1), ("minutes", 0),
                                               ("real_speech_repeats", 0)])
def test_out_of_range_settings_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        DemoSettings(**{option: value})


def test_real_speech_repeats_only_repeat_real_clips():
    import torch

    from speechlm.demo.run import FrameDataset

    rows = [{"source": "synthetic", "text": "a"}, {"source": "asterisk", "text": "b"},
            {"source": "synthetic", "text": "c"}]
    frames = [torch.full((n, 2), float(n)) for n in (3, 4, 5)]
    dataset = FrameDataset.from_rows(frames, rows, real_speech_repeats=3)
    assert dataset.texts == ["a", "b", "b", "b", "c"] and dataset.lengths == [3, 4, 4, 4, 5]
    assert all(dataset[i]["frames"] is frames[1] for i in (1, 2, 3))  # repeats share the cached frames
    assert FrameDataset.from_rows(frames, rows).texts == ["a", "b", "c"]


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


def test_report_puts_whisper_beside_each_set_and_states_steps_dtype_and_warnings(tmp_path):
    results = {"test_uqm": {"n_utterances": 2, "wer": 0.4, "cer": 0.2, "seconds": 3.0, "insertions": 7,
                            "whisper": {"wer": 0.18}, "rows": []}}
    history = {"loss": [], "steps": 900, "ctc_steps": 300, "llm_steps": 600, "minutes": 20.0,
               "dtype": "float32", "dtype_reason": "float32: this CPU has no native bfloat16",
               "warnings": ["WARNING: this machine trains 3.0 LLM steps per minute"]}
    text = write_report(tmp_path, DemoSettings(), history, results).read_text()
    assert "| test_uqm | 2 | 40.0% | 20.0% | 7 | 18.0% | 3 |" in text
    assert "300 CTC pre-alignment steps, 600 through the LLM" in text
    assert "float32: this CPU has no native bfloat16" in text
    assert "**WARNING: this machine trains 3.0 LLM steps per minute**" in text


def test_a_slow_machine_gets_a_loud_warning_and_a_normal_one_none():
    import torch

    from speechlm.demo.run import EXPECTED_LLM_STEPS_PER_MINUTE, slow_machine_warning
    from speechlm.hardware import DtypeChoice

    choice = DtypeChoice(torch.float32, "float32: this CPU has no native bfloat16")
    assert slow_machine_warning(EXPECTED_LLM_STEPS_PER_MINUTE, DemoSettings(), choice) is None
    message = slow_machine_warning(1.2, DemoSettings(minutes=20), choice)
    assert message.startswith("WARNING: this machine trains 1.2 LLM steps per minute")
    assert "--minutes 20" in message and "no native bfloat16" in message


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


def test_understanding_tasks_add_one_example_per_grammar_clip():
    import torch

    from speechlm.demo.grammar import Utterance
    from speechlm.demo.run import FrameDataset

    rows = [{"source": "synthetic", "text": "set an alarm for noon"}, {"source": "asterisk", "text": "goodbye"}]
    meanings = {"set an alarm for noon": Utterance("set an alarm for noon", "set_alarm", (("time", "noon"),))}
    frames = [torch.zeros(3, 2), torch.zeros(4, 2)]
    dataset = FrameDataset.from_rows(frames, rows, tasks=("transcribe", "slu"), meanings=meanings)
    assert dataset.tasks == ["transcribe", "slu", "transcribe"]
    assert dataset.texts == ["set an alarm for noon", "set an alarm for noon", "goodbye"]  # the CTC targets
    assert dataset[1]["target"] == '{"intent": "set_alarm", "time": "noon"}'


def test_collator_gives_the_ctc_head_the_transcript_when_the_answer_differs(build):
    import torch

    from speechlm.demo.run import FrameCollator

    processor, _ = build("whisper", "llama")
    transcript = {"frames": torch.zeros(5, 16), "text": "turn on the lights", "prompt": "Transcribe:",
                  "target": "turn on the lights"}
    answer = dict(transcript, prompt="Intent and slots as JSON:", target='{"intent": "turn"}')
    assert "ctc_labels" not in FrameCollator(processor)([transcript, transcript])
    batch = FrameCollator(processor)([transcript, answer])
    expected = processor.encode_text([processor.build_prompt(i["prompt"]) for i in (transcript, answer)],
                                     [transcript["text"]] * 2)["labels"]
    assert torch.equal(batch["ctc_labels"], expected)
    assert not torch.equal(batch["labels"], batch["ctc_labels"])


def test_step_bounded_schedule_gives_the_llm_phase_its_full_learning_rate():
    """With `--ctc-steps 80 --max-steps 100` the cosine runs over the 20 LLM steps, not over all 100."""
    import torch

    from speechlm.demo.run import time_cosine_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = time_cosine_schedule(optimizer, budget_seconds=1e9, warmup_steps=1, max_steps=100, first_step=80)
    factors = [schedule.lr_lambdas[0](step) for step in (0, 50, 80, 90, 100)]
    assert factors[:3] == [1.0, 1.0, 1.0]
    assert abs(factors[3] - 0.55) < 1e-9 and abs(factors[4] - 0.1) < 1e-9

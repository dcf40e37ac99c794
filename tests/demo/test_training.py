"""The demo's training (speechlm/demo/training.py): its examples, its batches over cached frames, its schedule."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from speechlm.data import EncoderCache, SpeechLMCollator, SpeechLMDataset
from speechlm.demo.grammar import Utterance
from speechlm.demo.settings import DemoSettings
from speechlm.demo.training import (
    PhaseWindow,
    TrainingClock,
    float32_frozen_weights,
    phase_frame_masking,
    time_cosine_schedule,
    training_records,
)


def record(text: str, source: str, seed: int = 0) -> dict:
    audio = np.random.default_rng(seed).standard_normal(1600).astype(np.float32)
    return {"audio": audio, "sampling_rate": 16_000, "text": text, "prompt": None, "task": None, "transcript": None,
            "id": text, "duration": 0.1, "location": text, "extra": {"source": source}}


def test_real_speech_repeats_only_repeat_real_clips():
    records = [record("a", "synthetic"), record("b", "asterisk"), record("c", "synthetic")]
    assert [r["text"] for r in training_records(records, real_speech_repeats=3)] == ["a", "b", "b", "b", "c"]
    assert [r["text"] for r in training_records(records)] == ["a", "b", "c"]


def test_understanding_tasks_add_one_example_per_grammar_clip():
    records = [record("set an alarm for noon", "synthetic"), record("goodbye", "asterisk")]
    meanings = {"set an alarm for noon": Utterance("set an alarm for noon", "set_alarm", (("time", "noon"),))}
    examples = training_records(records, tasks=("transcribe", "slu"), meanings=meanings)
    assert [r["task"] for r in examples] == ["transcribe", "slu", "transcribe"]
    assert [r["transcript"] for r in examples] == ["set an alarm for noon", "set an alarm for noon", "goodbye"]
    assert examples[1]["text"] == '{"intent": "set_alarm", "time": "noon"}'


def former_frame_collator(processor, frames: list[torch.Tensor], examples: list[dict], masking: float) -> dict:
    """The demo's own FrameCollator before it used the library's: float16 frames zero-padded in float32, SpecAugment
    on whole frames and channels, prompt + target ids, the transcripts as `ctc_labels` when a target differs."""
    lengths = torch.tensor([f.shape[0] for f in frames])
    padded = torch.zeros(len(frames), int(lengths.max()), frames[0].shape[1])
    for i, clip in enumerate(frames):
        padded[i, : lengths[i]] = clip.float()
    if masking > 0:
        padded *= torch.rand(padded.shape[0], padded.shape[1], 1) >= masking
        padded *= torch.rand(padded.shape[0], 1, padded.shape[2]) >= masking
    prompts = [processor.build_prompt(e["prompt"]) for e in examples]
    batch = processor.encode_text(prompts, [e["text"] for e in examples])
    if [e["text"] for e in examples] != [e["transcript"] for e in examples]:
        batch["ctc_labels"] = processor.encode_text(prompts, [e["transcript"] for e in examples])["labels"]
    return {"encoder_frames": padded, "encoder_frame_lengths": lengths, **batch}


def test_batches_over_the_library_cache_are_the_former_demo_batches(build):
    """Same frames (float16-rounded), lengths, labels, ctc_labels and masks as the demo's former FrameCollator."""
    processor, _ = build("whisper", "llama")
    records = [record("set an alarm for noon", "synthetic", 1), record("goodbye", "asterisk", 2)]
    meanings = {"set an alarm for noon": Utterance("set an alarm for noon", "set_alarm", (("time", "noon"),))}
    examples = training_records(records, 2, ("transcribe", "slu"), meanings)
    cache = EncoderCache("encoder", dtype=torch.float16)
    encoded = {r["id"]: torch.randn(n, 16) for r, n in zip(records, (40, 25), strict=True)}
    for r in records:
        cache.put(cache.key(r), encoded[r["id"]])
    lengths = [cache.get(cache.key(e)).shape[0] for e in examples]
    dataset = SpeechLMDataset(examples, 16_000, encoder_cache=cache, lengths=lengths)
    assert dataset.lengths == [40, 40, 25, 25]  # batched by frame count, as before
    torch.manual_seed(0)
    batch = SpeechLMCollator(processor, cache, frame_masking=0.3)([dataset[i] for i in range(len(dataset))])
    torch.manual_seed(0)
    frames = [encoded[e["id"]].half() for e in examples]
    expected = former_frame_collator(processor, frames, examples, masking=0.3)
    assert set(batch) == set(expected)
    for key, value in expected.items():
        assert torch.equal(batch[key].to(value.dtype), value), key


def test_a_slow_machine_gets_a_loud_warning_and_a_normal_one_none():
    from speechlm.demo.settings import DemoSettings
    from speechlm.demo.training import EXPECTED_LLM_STEPS_PER_MINUTE, slow_machine_warning
    from speechlm.hardware import DtypeChoice

    choice = DtypeChoice(torch.float32, "float32: this CPU has no native bfloat16")
    assert slow_machine_warning(EXPECTED_LLM_STEPS_PER_MINUTE, DemoSettings(), choice) is None
    message = slow_machine_warning(1.2, DemoSettings(minutes=20), choice)
    assert message.startswith("WARNING: this machine trains 1.2 LLM steps per minute")
    assert "--minutes 20" in message and "no native bfloat16" in message


def test_a_slow_machines_warning_offers_the_step_bounded_preset_with_its_time_there():
    """Raising --minutes is a guess; the augmented preset trains the steps its figures were measured with, and the
    warning says how long its LLM steps would take at this machine's rate (1,200 steps at 24 a minute: 50)."""
    from speechlm.demo.settings import DemoSettings
    from speechlm.demo.training import slow_machine_warning
    from speechlm.hardware import DtypeChoice

    choice = DtypeChoice(torch.float32, "float32: this CPU has no native bfloat16")
    message = slow_machine_warning(24.0, DemoSettings(minutes=20), choice)
    assert "--preset augmented" in message and "1,200 LLM steps take about 50 minutes here" in message


def test_a_slow_step_bounded_run_whose_steps_fit_its_budget_gets_no_warning():
    """`--max-steps` with a generous `--minutes`: slowness costs time, not training, so the report must not claim
    the model saw fewer examples; when the steps left do not fit, the warning stays."""
    from speechlm.demo.settings import DemoSettings
    from speechlm.demo.training import slow_machine_warning
    from speechlm.hardware import DtypeChoice

    choice = DtypeChoice(torch.float32, "float32: this CPU has no native bfloat16")
    settings = DemoSettings(minutes=1000, ctc_steps=4000, max_steps=5200)
    assert slow_machine_warning(16.0, settings, choice, steps_left=1000, minutes_left=900) is None
    assert slow_machine_warning(16.0, settings, choice, steps_left=1000, minutes_left=30) is not None


def test_a_step_bounded_run_short_of_time_is_told_to_raise_minutes_not_to_run_a_preset():
    from speechlm.demo.settings import DemoSettings
    from speechlm.demo.training import slow_machine_warning
    from speechlm.hardware import DtypeChoice

    choice = DtypeChoice(torch.float32, "float32: this CPU has no native bfloat16")
    settings = DemoSettings(minutes=30, ctc_steps=4000, max_steps=5200)
    message = slow_machine_warning(16.0, settings, choice, steps_left=1000, minutes_left=30)
    assert "(raise --minutes)" in message and "--preset" not in message


def test_step_bounded_schedule_gives_the_llm_phase_its_full_learning_rate():
    """With `--ctc-steps 80 --max-steps 100` the cosine runs over the 20 LLM steps, not over all 100."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = time_cosine_schedule(optimizer, budget_seconds=1e9, warmup_steps=1, max_steps=100, first_step=80)
    factors = [schedule.lr_lambdas[0](step) for step in (0, 50, 80, 90, 100)]
    assert factors[:3] == [1.0, 1.0, 1.0]
    assert abs(factors[3] - 0.55) < 1e-9 and abs(factors[4] - 0.1) < 1e-9


class FakeTime:
    def __init__(self):
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def test_the_training_clock_leaves_out_time_spent_drawing_the_curve():
    """A 20-minute budget buys 20 minutes of training however often the held-out curve is evaluated."""
    now = FakeTime()
    clock = TrainingClock(now)
    now.seconds = 60.0
    with clock.paused():
        now.seconds = 90.0  # a curve evaluation
    now.seconds = 100.0
    assert clock.elapsed() == 70.0


def test_the_time_budgeted_schedule_decays_over_training_time_only():
    now = FakeTime()
    clock = TrainingClock(now)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = time_cosine_schedule(optimizer, budget_seconds=100.0, warmup_steps=1, clock=clock)
    with clock.paused():
        now.seconds = 1000.0
    now.seconds = 1050.0  # half the budget trained
    assert abs(schedule.lr_lambdas[0](10) - 0.55) < 1e-9


def test_a_phase_window_gives_the_llm_phase_its_own_warmup_and_cosine():
    """With `phase_schedules`, the LLM phase after a 60 % pre-alignment starts at the full learning rate and decays over
    its own seconds, not from where the whole budget's cosine stands (41 %)."""
    now = FakeTime()
    clock = TrainingClock(now)
    window = PhaseWindow(60.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = time_cosine_schedule(optimizer, budget_seconds=100.0, warmup_steps=2, clock=clock, window=window)
    factor = schedule.lr_lambdas[0]
    now.seconds = 30.0
    assert abs(factor(500) - 0.55) < 1e-9  # halfway through the pre-alignment's own 60 seconds
    now.seconds = 60.0
    window.move(60.0, 1000, 40.0)
    assert abs(factor(1000) - 0.5) < 1e-9  # warmup again: the first of two steps
    assert abs(factor(1001) - 1.0) < 1e-9
    now.seconds = 80.0
    assert abs(factor(1100) - 0.55) < 1e-9


def test_a_step_cap_ends_the_phase_windows_decay_when_it_comes_first():
    """`--phase-schedules --max-steps 1100`: the LLM phase from step 1000 decays over its 100 steps to the cap, not
    over its 40 seconds alone, of which only a quarter has passed."""
    now = FakeTime()
    clock = TrainingClock(now)
    window = PhaseWindow(60.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = time_cosine_schedule(optimizer, budget_seconds=100.0, warmup_steps=1, max_steps=1100, clock=clock,
                                    window=window)
    window.move(60.0, 1000, 40.0)
    now.seconds = 70.0
    assert abs(schedule.lr_lambdas[0](1050) - 0.55) < 1e-9  # halfway through the steps to the cap
    assert abs(schedule.lr_lambdas[0](1100) - 0.1) < 1e-9


def test_float32_decoding_restores_bfloat16_weights_exactly(build):
    _, model = build("whisper", "llama", dtype=torch.bfloat16)
    model.freeze_encoder()
    model.freeze_decoder()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    with float32_frozen_weights(model):
        assert all(p.dtype == torch.float32 for p in model.parameters() if not p.requires_grad)
        assert model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16  # trainable: left alone
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert parameter.dtype == torch.bfloat16 and torch.equal(parameter, frozen[name]), name


def test_frame_masking_follows_the_phase():
    """`--frame-masking` masks frames while CTC pre-aligns; `--llm-frame-masking` takes over through the LLM."""
    settings = DemoSettings(frame_masking=0.2, llm_frame_masking=0.1)
    assert (phase_frame_masking(settings, ctc_phase=True), phase_frame_masking(settings, ctc_phase=False)) == (0.2, 0.1)


def test_augmented_repeats_give_each_real_copy_after_the_first_its_own_augmentation():
    records = [record("a", "synthetic"), record("b", "asterisk")]
    examples = training_records(records, real_speech_repeats=3, augment=True)
    assert [e["augment"] is None for e in examples] == [True, True, False, False]  # synthetic and first copy clean
    assert len({e["augment"] for e in examples[2:]}) == 2
    assert all(e["augment"] is None for e in training_records(records, real_speech_repeats=3))
    own = {**records[1], "augment": "telephone"}  # a manifest row's own augmentation stays on its first copy
    assert [e["augment"] for e in training_records([own], 2, augment=True)][0] == "telephone"


def test_the_cached_training_set_encodes_each_augmented_copy_once(build, tmp_path):
    from speechlm.demo.training import cached_training_set

    processor, model = build("whisper", "llama")
    model.freeze_encoder()
    records = [record("a", "synthetic", 1), record("b", "asterisk", 2)]
    examples = training_records(records, real_speech_repeats=3, augment=True)
    dataset = cached_training_set(model, processor, records, examples, tmp_path / "frames.safetensors")
    items = [dataset[i] for i in range(len(dataset))]
    assert all("audio" not in item for item in items)
    assert len({item["cache_key"] for item in items}) == 4
    assert len(dataset.encoder_cache) == 4


def test_deepspeed_is_told_the_demo_trains_on_the_cpu():
    """Installed by the set-up for sharded training, DeepSpeed would otherwise print that it found no GPU."""
    pytest.importorskip("deepspeed")
    code = ("from speechlm.demo.training import tell_deepspeed_the_device; tell_deepspeed_the_device(); "
            "from deepspeed.accelerator import get_accelerator; print(get_accelerator().device_name())")
    environment = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)
    assert done.stdout.split()[-1] == "cpu"
    assert "unable to detect" not in done.stdout + done.stderr


def test_callbacks_given_to_the_training_see_every_step(build, tmp_path):
    """benchmarks/gpu_real_speech.py snapshots the trainable weights from a callback of its own."""
    from transformers import TrainerCallback

    from speechlm.demo.training import cached_training_set, train_within_budget

    processor, model = build("whisper", "llama")
    model.freeze_encoder()
    records = [record("one two", "synthetic", 1), record("three four", "synthetic", 2)]
    dataset = cached_training_set(model, processor, records, training_records(records), tmp_path / "frames.safetensors")
    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    settings = DemoSettings(batch_size=2, max_steps=3, ctc_fraction=0.0, ctc_weight=0.0, lora_rank=0)
    train_within_budget(model, processor, dataset, settings, {}, tmp_path, callbacks=[Steps()])
    assert steps == [1, 2, 3]


def train_drawing_the_curve_every_step(build, tmp_path, **settings) -> dict:
    """Three steps of the demo's training on two tiny clips, the held-out curve drawn after each; its history."""
    from speechlm.demo.training import cached_training_set, train_within_budget
    from tests.conftest import make_clips

    processor, model = build("whisper", "llama")
    model.freeze_encoder()
    records = [record("one two", "synthetic", 1), record("three four", "synthetic", 2)]
    dataset = cached_training_set(model, processor, records, training_records(records), tmp_path / "frames.safetensors")
    curve_sets = {"synthetic": (make_clips(), ["one two", "three", "four five six"])}
    settings = DemoSettings(batch_size=2, max_steps=3, lora_rank=0, eval_every_minutes=1e-9, **settings)
    return train_within_budget(model, processor, dataset, settings, curve_sets, tmp_path)


def test_the_curve_reads_the_same_clips_with_the_ctc_head_alone_at_each_point(build, tmp_path):
    history = train_drawing_the_curve_every_step(build, tmp_path, ctc_fraction=1e-9)
    assert [step for _, step, _ in history["head_wer"]] == [step for _, step, _ in history["wer"]] == [1, 2]


def test_a_model_without_a_ctc_head_draws_the_llms_curve_alone(build, tmp_path):
    history = train_drawing_the_curve_every_step(build, tmp_path, ctc_fraction=0.0, ctc_weight=0.0)
    assert len(history["wer"]) == 2 and "head_wer" not in history


def test_with_phase_schedules_the_llm_phase_warms_up_afresh_where_the_pre_alignment_ends(build, tmp_path):
    """The demo moves the schedule's window when its time-bounded pre-alignment ends (here after the first step): the
    LLM phase's learning rate starts its warmup again instead of going on from the pre-alignment's."""
    from transformers import TrainerCallback

    from speechlm.demo.training import cached_training_set, train_within_budget

    processor, model = build("whisper", "llama")
    model.freeze_encoder()
    records = [record("one two", "synthetic", 1), record("three four", "synthetic", 2)]
    dataset = cached_training_set(model, processor, records, training_records(records), tmp_path / "frames.safetensors")
    rates = {}

    class Rates(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            rates[state.global_step] = optimizer.param_groups[0]["lr"]

    settings = DemoSettings(batch_size=2, max_steps=3, ctc_fraction=1e-9, lora_rank=0, phase_schedules=True,
                            eval_every_minutes=1e6)
    train_within_budget(model, processor, dataset, settings, {}, tmp_path, callbacks=[Rates()])
    # Warmup over 20 steps counted from the phase change at step 1, times the cosine over the phase's steps to the cap
    # of 3 (halfway at step 2: 0.55; its floor of 0.1 at step 3), which comes long before its 20 minutes.
    assert rates[2] == pytest.approx(settings.learning_rate * 2 / 20 * 0.55, rel=0.02)
    assert rates[3] == pytest.approx(settings.learning_rate * 3 / 20 * 0.1, rel=0.02)


def train_recording_text_rows(build, tmp_path, monkeypatch, texts: list[str], settings: DemoSettings):
    """Train the demo on tiny clips of `texts`; return the text-only rows each collated batch carried and the
    sentences the collator was given to draw them from."""
    import speechlm.demo.training as training
    from speechlm.data import SpeechLMCollator

    seen, given = [], []

    class Recording(SpeechLMCollator):  # the library's, not a Recording an earlier call patched in
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            given.extend(example["transcript"] for example in self.text_examples)

        def __call__(self, features):
            batch = super().__call__(features)
            seen.append(batch["text_input_ids"].shape[0] if "text_input_ids" in batch else 0)
            return batch

    monkeypatch.setattr(training, "SpeechLMCollator", Recording)
    processor, model = build("whisper", "llama")
    model.freeze_encoder()
    records = [record(text, "synthetic", seed) for seed, text in enumerate(texts, start=1)]
    dataset = training.cached_training_set(model, processor, records, training_records(records),
                                           tmp_path / "frames.safetensors")
    training.train_within_budget(model, processor, dataset, settings, {}, tmp_path)
    return seen, given


def text_rows_per_batch(build, tmp_path, monkeypatch, texts: list[str], settings: DemoSettings) -> list[int]:
    """Train the demo on tiny clips of `texts` and return the text-only rows each collated batch carried."""
    return train_recording_text_rows(build, tmp_path, monkeypatch, texts, settings)[0]


def test_text_rows_reach_every_batch_the_demo_trains_on(build, tmp_path, monkeypatch):
    settings = DemoSettings(batch_size=2, max_steps=2, ctc_fraction=0.0, ctc_weight=0.0, lora_rank=0,
                            tasks="transcribe,slu_transcript", text_rows=3)
    assert text_rows_per_batch(build, tmp_path, monkeypatch, ["one two", "three four"], settings) == [3, 3]


def test_text_rows_drawn_with_repeats_give_the_collator_repeated_sentences(build, tmp_path, monkeypatch):
    from speechlm.demo.training import TEXT_ONLY_SENTENCES

    given = {}
    for repeat in (False, True):
        settings = DemoSettings(batch_size=2, max_steps=1, ctc_fraction=0.0, ctc_weight=0.0, lora_rank=0,
                                tasks="transcribe,slu_transcript", text_rows=2, text_rows_repeat=repeat)
        (tmp_path / str(repeat)).mkdir()
        given[repeat] = train_recording_text_rows(build, tmp_path / str(repeat), monkeypatch, ["one two", "three four"],
                                                  settings)[1]
    assert len(set(given[False])) == len(given[False]) == TEXT_ONLY_SENTENCES
    assert len(given[True]) == TEXT_ONLY_SENTENCES and len(set(given[True])) < len(given[True])


def test_text_rows_start_with_the_llm_phase(build, tmp_path, monkeypatch):
    """CTC pre-alignment never reads text rows: its batches carry none, the LLM phase's do (all but the one batch the
    data loader had already collated when the phase changed)."""
    settings = DemoSettings(batch_size=2, ctc_steps=2, max_steps=5, lora_rank=0,
                            tasks="transcribe,slu_transcript", text_rows=3)
    texts = ["one two", "three four", "five six", "seven", "eight nine", "ten"]
    seen = text_rows_per_batch(build, tmp_path, monkeypatch, texts, settings)
    assert seen[:2] == [0, 0] and seen[-3:] == [3, 3, 3]

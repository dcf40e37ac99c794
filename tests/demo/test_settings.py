"""The demo's settings and options (speechlm/demo/settings.py)."""

from __future__ import annotations

import argparse

import pytest

from speechlm.demo.settings import (
    PRESETS,
    DemoSettings,
    add_arguments,
    describe_preset,
    settings_from_args,
)


def parse(*argv: str) -> DemoSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))


def test_every_option_reaches_the_settings():
    assert parse("--dtype", "bfloat16") == DemoSettings(dtype="bfloat16")
    settings = parse("--lora-targets", "q_proj,k_proj", "--stack-factor", "8", "--num-beams", "3", "--ctc-weight", "0",
                     "--ctc-fraction", "0.25", "--frame-masking", "0.2", "--lora-learning-rate", "1e-4",
                     "--n-train", "50", "--no-ctc-compression", "--real-speech-repeats", "3",
                     "--real-speech-augment", "--joint-ctc-weight", "0.4", "--distill-weight", "0.5",
                     "--distill-agreeing-only", "--voice-perturbation", "0.1",
                     "--accent-fraction", "0.5")
    assert (settings.lora_targets, settings.stack_factor, settings.num_beams) == ("q_proj,k_proj", 8, 3)
    assert (settings.ctc_weight, settings.ctc_fraction, settings.frame_masking) == (0, 0.25, 0.2)
    assert (settings.lora_learning_rate, settings.n_train) == (1e-4, 50)
    assert (settings.ctc_compression, settings.real_speech_repeats, settings.real_speech_augment) == (False, 3, True)
    assert (settings.joint_ctc_weight, settings.distill_weight, settings.distill_agreeing_only) == (0.4, 0.5, True)
    assert (settings.voice_perturbation, settings.accent_fraction) == (0.1, 0.5)
    assert parse("--ctc-compression").ctc_compression is True


def test_understanding_answers_have_their_own_beam_width():
    assert (DemoSettings().num_beams, DemoSettings().understanding_beams) == (4, 8)
    assert parse("--understanding-beams", "2", "--num-beams", "3").understanding_beams == 2


def test_model_key_ignores_evaluation_only_settings():
    base = DemoSettings()
    assert DemoSettings(num_beams=4, understanding_beams=2, eval_limit=5,
                        joint_ctc_weight=0.2).fingerprint() == base.fingerprint()
    for changed in (DemoSettings(lora_targets="q_proj"), DemoSettings(stack_factor=8), DemoSettings(ctc_weight=0),
                    DemoSettings(distill_weight=1.0), DemoSettings(voice_perturbation=0.1),
                    DemoSettings(accent_fraction=0.5)):
        assert changed.fingerprint() != base.fingerprint()


@pytest.mark.parametrize(("option", "value"), [("ctc_fraction", 1.0), ("frame_masking", -0.1), ("minutes", 0),
                                               ("real_speech_repeats", 0), ("llm_frame_masking", 1.0),
                                               ("lora_dropout", -0.5), ("joint_ctc_weight", 1.5),
                                               ("distill_weight", -1.0), ("voice_perturbation", 0.5),
                                               ("accent_fraction", 1.0), ("num_beams", 0),
                                               ("understanding_beams", 0), ("text_rows", -1),
                                               ("open_share", 1.0)])
def test_out_of_range_settings_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        DemoSettings(**{option: value})


def test_text_rows_reach_the_settings_and_name_another_model():
    settings = parse("--tasks", "transcribe,slu_transcript", "--text-rows", "8")
    assert settings.text_rows == 8
    assert settings.fingerprint() != parse("--tasks", "transcribe,slu_transcript").fingerprint()


def test_text_rows_drawn_with_repeats_reach_the_settings_and_name_another_model():
    settings = parse("--tasks", "transcribe,slu_transcript", "--text-rows", "8", "--text-rows-repeat")
    assert settings.text_rows_repeat is True
    assert settings.fingerprint() != parse("--tasks", "transcribe,slu_transcript", "--text-rows", "8").fingerprint()


def test_text_rows_drawn_with_repeats_without_text_rows_are_refused():
    with pytest.raises(ValueError, match="text_rows_repeat changes how the text-only rows are drawn"):
        DemoSettings(tasks="transcribe,slu_transcript", text_rows_repeat=True)


def test_an_open_share_reaches_the_settings_and_names_another_model():
    settings = parse("--open-share", "0.5")
    assert settings.open_share == 0.5
    assert settings.fingerprint() != parse().fingerprint()


def test_an_open_share_without_the_mixed_corpus_is_refused_even_at_the_mixs_default():
    with pytest.raises(ValueError, match="give --corpus mixed"):
        parse("--corpus", "structured", "--open-share", str(DemoSettings().open_share))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_trains_on_the_structured_corpus_it_was_measured_on(preset):
    # The default corpus became the mix in session 50; every preset's figures come from the grammar alone.
    assert parse("--preset", preset).corpus == "structured"


def test_the_default_encoder_is_whisper_base():
    assert parse().encoder == "bundled-base"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_keeps_the_encoder_it_was_measured_with(preset):
    # Every preset's figures come from Whisper tiny.en; the default moved to Whisper base in session 61.
    assert parse("--preset", preset).encoder == "bundled"


@pytest.mark.parametrize(("preset", "real_speech", "natural_fraction"),
                         [("augmented", False, 0.0), ("understanding", False, 0.0), ("real-speech", True, 0.3)])
def test_a_preset_trains_on_the_real_speech_it_was_measured_with(preset, real_speech, natural_fraction):
    # The default trains on the UQM actors without Pico sentences since session 51; the presets' figures predate it.
    settings = parse("--preset", preset)
    assert (settings.real_speech, settings.natural_fraction) == (real_speech, natural_fraction)


def test_the_default_trains_on_the_uqm_actors_with_every_sentence_in_espeak_voices():
    assert (parse().real_speech, parse().natural_fraction) == (True, 0.0)


def test_pico_sentences_without_the_real_speech_are_refused():
    with pytest.raises(ValueError, match="give --real-speech"):
        parse("--no-real-speech", "--natural-fraction", "0.3")


def test_cutting_long_clips_without_the_real_speech_is_refused():
    with pytest.raises(ValueError, match="give --real-speech"):
        parse("--no-real-speech", "--cut-long-clips")


def test_processed_voices_without_the_real_speech_are_refused():
    with pytest.raises(ValueError, match="give --real-speech"):
        parse("--no-real-speech", "--processed-voices")


def test_pico_reading_all_lines_without_the_real_speech_is_refused():
    with pytest.raises(ValueError, match="give --real-speech"):
        parse("--no-real-speech", "--pico-all-lines")


def test_pico_reading_all_lines_reaches_the_settings_and_names_another_model():
    assert parse("--pico-all-lines").pico_all_lines and not DemoSettings().pico_all_lines
    assert parse("--pico-all-lines").fingerprint() != parse().fingerprint()


def test_processed_voices_reach_the_settings_and_name_another_model():
    assert parse("--processed-voices").processed_voices and not DemoSettings().processed_voices
    assert parse("--processed-voices").fingerprint() != parse().fingerprint()


def test_a_preset_is_described_by_the_options_that_set_it():
    assert describe_preset("augmented").startswith("--encoder bundled, --corpus structured, --no-real-speech, ")


def test_text_rows_without_an_understanding_task_are_refused():
    with pytest.raises(ValueError, match="text_rows teach understanding answers"):
        DemoSettings(text_rows=8)


def test_distilling_only_where_the_teacher_agrees_needs_a_distillation_weight():
    with pytest.raises(ValueError, match="distill_agreeing_only without distill_weight"):
        DemoSettings(distill_agreeing_only=True)


def test_a_preset_sets_its_recipe():
    settings = parse("--preset", "real-speech")
    assert settings == DemoSettings(**PRESETS["real-speech"])
    assert settings.real_speech and settings.minutes == 100


def test_the_real_speech_preset_repeats_its_real_clips_unaugmented_as_measured():
    settings = parse("--preset", "real-speech")
    assert (settings.real_speech_repeats, settings.real_speech_augment) == (3, False)
    assert DemoSettings().real_speech_augment  # while the default augments them


def test_the_augmented_preset_is_bounded_by_steps_with_a_time_cap():
    settings = parse("--preset", "augmented")
    assert settings == DemoSettings(**PRESETS["augmented"])
    assert (settings.ctc_steps, settings.max_steps) == (4000, 5200) and settings.real_speech_augment


def test_the_understanding_preset_trains_three_tasks_with_the_long_pre_alignment_and_text_rows():
    settings = parse("--preset", "understanding")
    assert settings == DemoSettings(**PRESETS["understanding"])
    assert settings.tasks == "transcribe,slu_transcript,qa_transcript"
    recipe = (settings.ctc_steps, settings.max_steps, settings.frame_masking, settings.text_rows)
    assert recipe == (12000, 13200, 0.1, 8)


def test_a_rerun_with_other_decoding_flags_names_the_same_model():
    # The model is reused, only decoded again (num_beams and the joint weight are evaluation-only).
    greedy = parse("--preset", "augmented", "--num-beams", "1", "--joint-ctc-weight", "0")
    assert greedy.num_beams == 1 and greedy.fingerprint() == parse("--preset", "augmented").fingerprint()


def test_an_option_given_beside_a_preset_wins_in_either_order():
    assert parse("--preset", "real-speech", "--minutes", "30").minutes == 30
    assert parse("--minutes", "20", "--preset", "real-speech").minutes == 20  # the default value, given explicitly
    assert parse("--no-real-speech", "--preset", "real-speech").real_speech is False


def test_an_unknown_preset_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        parse("--preset", "fastest")
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


def test_the_budget_is_described_by_time_by_default():
    assert DemoSettings(minutes=20).describe_budget() == (
        "20 minutes, the first 60% of the time (12.0 minutes): CTC pre-alignment of the projector alone")


def test_the_budget_is_described_by_steps_where_steps_bound_it():
    text = DemoSettings(ctc_steps=4000, max_steps=6000).describe_budget()
    assert text == "6000 steps or 20 minutes, the first 4000 steps: CTC pre-alignment of the projector alone"


def test_training_follows_the_corpus_seed_unless_a_train_seed_is_given():
    assert DemoSettings(seed=3).training_seed == 3
    assert parse("--train-seed", "1").training_seed == 1


def test_a_train_seed_names_another_model_on_the_same_corpus():
    assert DemoSettings(train_seed=1).fingerprint() != DemoSettings().fingerprint()


def test_joint_ctc_decoding_needs_a_run_that_trains_the_ctc_head():
    assert DemoSettings().decoding_ctc_weight == DemoSettings().joint_ctc_weight > 0
    assert DemoSettings(ctc_weight=0, ctc_fraction=0).decoding_ctc_weight == 0  # no head: the LLM alone
    assert DemoSettings(ctc_weight=0, ctc_fraction=0, ctc_steps=10).decoding_ctc_weight > 0


def test_the_default_pre_aligns_for_the_same_share_of_its_budget_whatever_the_training_dtype():
    """Measured in float32 (session 58) and in bfloat16 (session 63): the larger share wins on both."""
    shares = {parse("--dtype", dtype).ctc_fraction for dtype in ("float32", "bfloat16", "auto")}
    assert shares == {DemoSettings().ctc_fraction}


def test_a_ctc_fraction_given_on_the_command_line_wins_over_the_default():
    assert parse("--ctc-fraction", "0.2").ctc_fraction == 0.2


@pytest.mark.parametrize("phase", [{"ctc_steps": 500}, {"ctc_fraction": 0.0}])
def test_phase_schedules_without_a_time_bounded_pre_alignment_are_refused(phase):
    """The option restarts the schedule where a time-bounded pre-alignment ends: elsewhere it would be silently idle."""
    with pytest.raises(ValueError, match="phase_schedules starts the LLM phase's schedule afresh"):
        DemoSettings(phase_schedules=True, **phase)


def test_the_real_speech_preset_keeps_the_ctc_share_it_was_measured_with():
    """Sessions 9-10 measured it with 15 % of the budget in pre-alignment, the default of then."""
    assert parse("--preset", "real-speech").ctc_fraction == 0.15

"""The demo's report (speechlm/demo/report.py)."""

from __future__ import annotations

from speechlm.demo.report import write_report
from speechlm.demo.settings import DemoSettings

# one held-out clip, half its words wrong
ONE_CLIP = {"test_synthetic": {"n_utterances": 1, "wer": 0.5, "cer": 0.25, "seconds": 1.0, "insertions": 0,
                               "rows": [{"id": "a", "ref": "turn on", "hyp": "turn off", "wer": 0.5}]}}


def test_report_states_loss_and_decoding(tmp_path):
    results = ONE_CLIP
    history = {"loss": [(0.1, 10, 3.0), (1.0, 20, 1.0)], "wer": [(0.5, 15, 0.8)], "steps": 20, "minutes": 1.0}
    settings = DemoSettings(ctc_weight=0.5, ctc_fraction=0.25, num_beams=3, joint_ctc_weight=0.6)
    text = write_report(tmp_path, settings, history, results).read_text()
    assert "LLM loss + 0.5 x CTC alignment loss" in text and "beam width 3" in text
    assert "jointly with the CTC head (weight 0.6; the LLM and the head each propose" in text
    usage = f"speechlm transcribe FILE --model {tmp_path / 'model'} --tokens-per-second 5 --num-beams 3`"
    assert usage in text and "carries its joint CTC weight (0.6) with its head" in text
    assert "the first 25% of the time (5.0 minutes): CTC pre-alignment" in text
    assert "| test_synthetic | 1 | 50.0% | 25.0% | 0 | - | 1 |" in text
    text = write_report(tmp_path, DemoSettings(ctc_weight=0.0, ctc_fraction=0.0, num_beams=1,
                                                   real_speech_repeats=1), history, results).read_text()
    assert "CTC" not in text and "greedily" in text and "real-speech" not in text
    text = write_report(tmp_path, DemoSettings(ctc_compression=True, real_speech_repeats=3), history,
                        results).read_text()
    assert "CTC-compressed audio" in text and "real-speech clips x3 (copies augmented)" in text
    assert "distillation" not in text
    text = write_report(tmp_path, DemoSettings(distill_weight=0.5), history, results).read_text()
    assert "x CTC alignment loss + 0.5 x KL to the text-only LLM reading the transcript (distillation)" in text
    text = write_report(tmp_path, DemoSettings(distill_weight=0.5, distill_agreeing_only=True), history,
                        results).read_text()
    assert "(distillation, on the answer tokens the teacher predicts)" in text


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


def test_report_calls_whisper_tiny_en_the_same_encoder_only_when_it_is(tmp_path):
    history = {"loss": [], "steps": 1, "minutes": 0.1}
    tiny = write_report(tmp_path, DemoSettings(encoder="bundled"), history, {}).read_text()
    assert "(the same encoder with its own decoder)" in tiny
    text = write_report(tmp_path, DemoSettings(), history, {}).read_text()
    assert "Encoder `bundled-base`" in text and "same encoder" not in text


def test_report_tables_the_held_out_curve_of_every_set_by_minutes_and_step(tmp_path):
    history = {"loss": [], "steps": 40, "minutes": 2.0, "wer": [(1.0, 20, 0.5), (2.0, 40, 0.25)],
               "wer_asterisk": [(1.0, 20, 0.75), (2.0, 40, 0.4)], "wer_uqm": [(2.0, 40, 0.9)]}
    text = write_report(tmp_path, DemoSettings(), history, {}).read_text()
    assert "| minutes | step | synthetic | Asterisk (real phone prompts) | UQM (real, unseen speakers) |" in text
    assert "| 1.0 | 20 | 50.0% | 75.0% | - |" in text and "| 2.0 | 40 | 25.0% | 40.0% | 90.0% |" in text


def test_report_tables_the_ctc_heads_curve_under_the_llms(tmp_path):
    history = {"loss": [], "steps": 40, "minutes": 2.0, "wer": [(1.0, 20, 1.2), (2.0, 40, 0.25)],
               "head_wer": [(1.0, 20, 0.6), (2.0, 40, 0.3)]}
    text = write_report(tmp_path, DemoSettings(), history, {}).read_text()
    llm, head = text.index("greedy, the LLM alone"), text.index("read by the CTC head alone")
    assert llm < head and "| 1.0 | 20 | 120.0% |" in text[llm:head] and "| 1.0 | 20 | 60.0% |" in text[head:]


def test_a_held_out_set_shows_the_ctc_heads_reading_beside_the_models_and_whisper(tmp_path):
    from speechlm.demo.report import result_line

    metrics = {"wer": 0.2, "cer": 0.1, "insertions": 3, "n_utterances": 4, "seconds": 5.0, "rows": [],
               "ctc_head": {"wer": 0.25}, "whisper": {"wer": 0.05}}
    assert result_line("test_uqm", metrics).endswith("4 clips, the CTC head alone 25.0%, Whisper tiny.en 5.0%)")
    text = write_report(tmp_path, DemoSettings(), {"loss": [], "steps": 1, "minutes": 0.1}, {"test_uqm": metrics})
    assert "| test_uqm | 4 | 20.0% | 10.0% | 3 | 25.0% | 5.0% | 5 |" in text.read_text()


def test_report_has_no_curve_table_without_a_curve(tmp_path):
    text = write_report(tmp_path, DemoSettings(), {"loss": [], "steps": 1, "minutes": 0.1}, {}).read_text()
    assert "| minutes | step |" not in text


def test_report_puts_free_decoding_and_the_cascade_beside_each_understanding_task(tmp_path):
    def slu(valid, intent, f1):
        return {"valid_json": valid, "intent_accuracy": intent, "slot_f1": f1}

    understanding = {"slu": {**slu(1.0, 0.96, 0.7), "n_utterances": 2, "seconds": 4.0, "rows": [], "prompts": [],
                             "free": slu(0.99, 0.75, 0.6), "cascade": slu(0.94, 0.1, 0.02)}}
    history = {"loss": [], "steps": 10, "minutes": 1.0}
    text = write_report(tmp_path, DemoSettings(tasks="transcribe,slu"), history, {}, understanding).read_text()
    assert ("| slu | 2 | valid JSON 100.0%, intent accuracy 96.0%, slot F1 70.0% | - | valid JSON 99.0%, intent "
            "accuracy 75.0%, slot F1 60.0% | valid JSON 94.0%, intent accuracy 10.0%, slot F1 2.0% | 4 |") in text


def test_report_states_the_understanding_answers_own_beam_width(tmp_path):
    understanding = {"slu": {"valid_json": 1.0, "intent_accuracy": 1.0, "slot_f1": 1.0, "n_utterances": 1,
                             "seconds": 1.0, "rows": [], "prompts": []}}
    history = {"loss": [], "steps": 10, "minutes": 1.0}
    settings = DemoSettings(tasks="transcribe,slu", num_beams=4, understanding_beams=6)
    text = write_report(tmp_path, settings, history, {}, understanding).read_text()
    assert "held-out voices and sentences), decoded beam width 6 (`--understanding-beams`)" in text


def test_report_puts_the_best_beam_quoted_or_not_beside_the_answer(tmp_path):
    frame = {"valid_json": 1.0, "intent_accuracy": 0.9, "slot_f1": 0.8}
    understanding = {"slu_transcript": {**frame, "n_utterances": 2, "seconds": 4.0, "rows": [], "prompts": [],
                                        "best_beam": {**frame, "intent_accuracy": 0.95}}}
    history = {"loss": [], "steps": 10, "minutes": 1.0}
    text = write_report(tmp_path, DemoSettings(tasks="transcribe,slu_transcript"), history, {},
                        understanding).read_text()
    assert ("| slu_transcript | 2 | valid JSON 100.0%, intent accuracy 90.0%, slot F1 80.0% | valid JSON 100.0%, "
            "intent accuracy 95.0%, slot F1 80.0% | - | - | 4 |") in text


def test_report_shows_all_a_transcript_first_answer_wrote_beside_its_reference(tmp_path):
    output = '{"transcript": "how far is paris from rome", "answer": "rome"}'
    row = {"id": "a", "ref": "paris", "hyp": "rome", "exact_match": False, "token_f1": 0.0, "output": output}
    understanding = {"qa_transcript": {"exact_match": 0.0, "token_f1": 0.0, "n_utterances": 1, "seconds": 1.0,
                                       "rows": [row], "prompts": ["What city does the speaker mention? ..."]}}
    history = {"loss": [], "steps": 10, "minutes": 1.0}
    text = write_report(tmp_path, DemoSettings(tasks="transcribe,qa_transcript"), history, {},
                        understanding).read_text()
    assert f"| What city does the speaker mention? ... | paris | {output} |" in text


def test_report_names_the_share_of_open_domain_sentences_a_mixed_corpus_trained_on(tmp_path):
    text = write_report(tmp_path, DemoSettings(open_share=0.5), {"steps": 20, "minutes": 1.0}, ONE_CLIP).read_text()
    assert "corpus `mixed` (50% of the training sentences from the fortunes); " in text


def test_report_names_the_training_levers_a_run_set(tmp_path):
    results = ONE_CLIP
    history = {"steps": 20, "minutes": 1.0}
    text = write_report(tmp_path, DemoSettings(), history, results).read_text()
    assert "masked" not in text and "perturbation" not in text and "training seed" not in text
    settings = DemoSettings(frame_masking=0.1, voice_perturbation=0.1, accent_fraction=0.25, real_speech=False,
                            train_seed=1)
    text = write_report(tmp_path, settings, history, results).read_text()
    assert ("frames and channels masked at 0.1 in the pre-alignment; voice perturbation 0.1; 25% of the sentences "
            "in a simulated accent; training seed 1)." in text)


def test_report_names_the_real_speech_a_run_trained_on(tmp_path):
    history = {"steps": 20, "minutes": 1.0}
    assert "UQM" not in write_report(tmp_path, DemoSettings(real_speech=False), history, ONE_CLIP).read_text()
    text = write_report(tmp_path, DemoSettings(), history, ONE_CLIP).read_text()
    assert "; the UQM training actors' clips and Pico readings of their lines)." in text
    text = write_report(tmp_path, DemoSettings(real_speech=True, natural_fraction=0.3), history, ONE_CLIP).read_text()
    assert "; the UQM training actors' clips and Pico readings of their lines, 30% of the sentences by Pico" in text


def test_report_names_the_cut_long_clips(tmp_path):
    text = write_report(tmp_path, DemoSettings(cut_long_clips=True), {"steps": 20, "minutes": 1.0}, ONE_CLIP)
    assert "Pico readings of their lines, their clips over 15 s cut at sentence ends in pauses)." in text.read_text()


def test_report_names_the_processed_voices(tmp_path):
    text = write_report(tmp_path, DemoSettings(processed_voices=True), {"steps": 20, "minutes": 1.0}, ONE_CLIP)
    assert "Pico readings of their lines, their processed (robotic, pitched) voices too)." in text.read_text()


def test_report_names_the_pico_readings_of_all_lines(tmp_path):
    text = write_report(tmp_path, DemoSettings(pico_all_lines=True), {"steps": 20, "minutes": 1.0}, ONE_CLIP)
    assert "Pico readings of their lines, also of the lines whose clips are not trained on)." in text.read_text()


def test_a_held_out_set_is_kept_on_disk_and_on_the_console_as_it_ends(tmp_path, capsys):
    # The understanding tasks take most of an hour on a CPU: a run stopped there must keep the sets already decoded.
    import json

    from speechlm.demo.report import keep_result

    keep_result(tmp_path, "test_synthetic", ONE_CLIP["test_synthetic"])
    rows = [json.loads(line) for line in (tmp_path / "test_synthetic.hypotheses.jsonl").read_text().splitlines()]
    assert rows == ONE_CLIP["test_synthetic"]["rows"]
    assert "[demo] WER synthetic: 50.0%  (CER 25.0%, 0 inserted words, 1 clips)" in capsys.readouterr().out


def test_an_understanding_task_line_puts_free_decoding_and_the_cascade_beside_it_when_measured():
    from speechlm.demo.report import result_line

    qa = {"exact_match": 0.8, "token_f1": 0.9, "n_utterances": 5}
    assert result_line("qa", qa) == "QA exact match 80.0%, token F1 90.0% (5 held-out clips)"
    line = result_line("qa", {**qa, "free": {"exact_match": 0.6, "token_f1": 0.7},
                              "cascade": {"exact_match": 0.2, "token_f1": 0.3}})
    assert line.endswith("(5 held-out clips; free decoding: exact match 60.0%, token F1 70.0%; cascade Whisper "
                         "tiny.en -> same LLM few-shot: exact match 20.0%, token F1 30.0%)")


def test_an_understanding_task_line_puts_the_best_beam_beside_it_when_measured():
    from speechlm.demo.report import result_line

    qa = {"exact_match": 0.8, "token_f1": 0.9, "n_utterances": 5}
    line = result_line("qa_transcript", {**qa, "best_beam": {"exact_match": 0.9, "token_f1": 0.95}})
    assert line.endswith("(5 held-out clips; the best beam, quoted or not: exact match 90.0%, token F1 95.0%)")

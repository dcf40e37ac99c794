"""The demo's held-out decoding (speechlm/demo/evaluate.py), without a trained model."""

from __future__ import annotations

import pytest


def test_the_demo_caps_new_tokens_by_clip_length_at_its_rate(monkeypatch):
    # The cap itself is the library's (tests/inference/test_decoding.py); the demo must ask for it, at its rate.
    import speechlm.inference
    from speechlm.demo.evaluate import TOKENS_PER_SECOND, transcribe_capped

    calls = []
    monkeypatch.setattr(speechlm.inference, "transcribe_arrays", lambda *args, **kwargs: calls.append(kwargs) or [])
    transcribe_capped(None, None, [], max_new_tokens=96, batch_size=4)
    assert calls == [{"batch_size": 4, "max_new_tokens": 96, "tokens_per_second": TOKENS_PER_SECOND}]


def one_clip_per_set(tmp_path, text: str) -> dict:
    """Manifests of every held-out set, each one clip (a tone under `text`)."""
    import json

    import soundfile as sf

    from speechlm.demo.evaluate import TEST_SETS
    from tests.audio_files import tone

    sf.write(tmp_path / "a.wav", tone(1.0, 16000), 16000)
    for name in TEST_SETS:
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"id": "a", "audio": "a.wav", "text": text}) + "\n")
    return {name: tmp_path / f"{name}.jsonl" for name in TEST_SETS}


def test_held_out_sets_decode_with_the_callers_keywords_on_the_sets_asked(monkeypatch, tmp_path):
    # benchmarks/decoding_levers.py measures decoding levers through this: a keyword that did not reach the decoder
    # would make every row of its table the baseline.
    import speechlm.inference
    from speechlm.demo.evaluate import evaluate_sets

    manifests = one_clip_per_set(tmp_path, "hello there")
    calls = []
    monkeypatch.setattr(speechlm.inference, "transcribe_arrays",
                        lambda model, processor, audio, **kwargs: calls.append(kwargs) or ["hello there"] * len(audio))
    results = evaluate_sets(None, None, manifests, None, reference=False, sets=("test_asterisk",),
                            repetition_penalty=1.2)
    assert list(results) == ["test_asterisk"] and results["test_asterisk"]["wer"] == 0
    assert [call["repetition_penalty"] for call in calls] == [1.2]


def score_exact_answers_asking_for_the_head(build, monkeypatch, tmp_path, with_head: bool) -> dict:
    """One UQM clip scored with `ctc_head=True` where every answer is the reference, by a tiny model with a random
    CTC head or none; its metrics."""
    import speechlm.inference
    from speechlm.demo.evaluate import evaluate_sets

    processor, model = build("whisper", "llama")
    if with_head:
        model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    monkeypatch.setattr(speechlm.inference, "transcribe_arrays",
                        lambda model, processor, audio, **kwargs: ["hello there"] * len(audio))
    manifests = one_clip_per_set(tmp_path, "hello there")
    return evaluate_sets(model, processor, manifests, None, reference=False, sets=("test_uqm",), ctc_head=True)[
        "test_uqm"]


def test_held_out_sets_score_the_ctc_heads_own_reading_beside_the_models_when_asked(build, monkeypatch, tmp_path):
    """The head's figure comes from its own transcripts: here the answers are exact while a random head's are not."""
    metrics = score_exact_answers_asking_for_the_head(build, monkeypatch, tmp_path, with_head=True)
    assert metrics["wer"] == 0 and metrics["ctc_head"]["wer"] > 0


def test_a_model_without_a_ctc_head_is_scored_without_one_when_asked(build, monkeypatch, tmp_path):
    metrics = score_exact_answers_asking_for_the_head(build, monkeypatch, tmp_path, with_head=False)
    assert metrics["wer"] == 0 and "ctc_head" not in metrics


def test_each_held_out_set_is_handed_on_as_it_ends_before_the_next_is_decoded(monkeypatch, tmp_path):
    # The demo keeps each set's figures and hypotheses through this (`keep_result`): handed on only at the end, a run
    # stopped during a later set would lose them all.
    import speechlm.inference
    from speechlm.demo.evaluate import evaluate_sets

    manifests = one_clip_per_set(tmp_path, "hello")
    events = []
    monkeypatch.setattr(speechlm.inference, "transcribe_arrays",
                        lambda model, processor, audio, **kwargs: events.append("decode") or ["hello"] * len(audio))
    evaluate_sets(None, None, manifests, None, reference=False, sets=("test_synthetic", "test_asterisk"),
                  on_result=lambda name, metrics: events.append((name, metrics["wer"])))
    assert events == ["decode", ("test_synthetic", 0.0), "decode", ("test_asterisk", 0.0)]


def one_held_out_sentence(tmp_path) -> dict:
    """Manifests with one held-out synthetic clip (a tone under a held-out sentence with slots)."""
    import json

    import soundfile as sf

    from speechlm.demo.grammar import TEST_SEED_OFFSET, _utterance_stream, is_held_out
    from tests.audio_files import tone

    sf.write(tmp_path / "a.wav", tone(1.0, 16000), 16000)
    held_out = next(u for u in _utterance_stream(TEST_SEED_OFFSET) if is_held_out(u.text) and u.slots)
    (tmp_path / "test_synthetic.jsonl").write_text(json.dumps({"id": "a", "audio": "a.wav", "text": held_out.text})
                                                   + "\n")
    return {"test_synthetic": tmp_path / "test_synthetic.jsonl"}


def test_each_understanding_task_is_handed_on_as_it_ends_before_the_next_is_decoded(monkeypatch, tmp_path):
    import speechlm.inference
    from speechlm.demo.evaluate import evaluate_understanding

    events = []
    monkeypatch.setattr(speechlm.inference, "transcribe_arrays",
                        lambda model, processor, audios, **kwargs: events.append("decode") or ["{}"] * len(audios))
    monkeypatch.setattr("speechlm.demo.evaluate.joint_decoding", lambda *args: {})
    evaluate_understanding(None, None, one_held_out_sentence(tmp_path), ("transcribe", "slu", "qa"), seed=0,
                           limit=None, on_result=lambda task, metrics: events.append((task, metrics["n_utterances"])))
    assert events == ["decode", "decode", ("slu", 1), "decode", "decode", ("qa", 1)]  # held, free, then the task


def test_understanding_answers_are_decoded_with_the_callers_beams_and_slu_held_to_the_catalogue(monkeypatch, tmp_path):
    # The demo decodes its understanding answers as its transcriptions (4 beams by default); a width that did not
    # reach the decoder would report greedy figures under the demo's name.
    import speechlm.inference
    from speechlm.demo.evaluate import evaluate_understanding
    from speechlm.demo.understanding import task_schema

    calls = []

    def decode(model, processor, audios, num_return_sequences=1, **kwargs):
        calls.append(kwargs)
        return [["{}"] * num_return_sequences if num_return_sequences > 1 else "{}" for _ in audios]

    monkeypatch.setattr(speechlm.inference, "transcribe_arrays", decode)
    monkeypatch.setattr("speechlm.demo.evaluate.joint_decoding", lambda *args: {})
    evaluate_understanding(None, None, one_held_out_sentence(tmp_path), ("transcribe", "slu_transcript", "qa"),
                           seed=0, limit=None, num_beams=4)
    assert [call["num_beams"] for call in calls] == [4, 4, 4, 4]  # held and free, for each task
    assert calls[0]["json_schema"] == task_schema("slu_transcript", values=True, quoted=True)


def test_the_answer_is_the_best_beam_with_every_value_quoted_the_best_beam_scored_beside(monkeypatch, tmp_path):
    import json

    import speechlm.inference
    from speechlm.demo.evaluate import evaluate_understanding
    from speechlm.demo.grammar import utterances
    from speechlm.demo.understanding import slu_target

    manifests = one_held_out_sentence(tmp_path)
    text = json.loads(manifests["test_synthetic"].read_text())["text"]
    right = slu_target(utterances([text], 0)[text], transcript=True)
    wrong = json.dumps({"transcript": text, "intent": "call", "contact": "nobody said this"})
    calls = []

    def decode(model, processor, audios, num_return_sequences=1, **kwargs):
        calls.append(num_return_sequences)
        return [[wrong, right, wrong, wrong] if num_return_sequences > 1 else wrong for _ in audios]

    monkeypatch.setattr(speechlm.inference, "transcribe_arrays", decode)
    monkeypatch.setattr("speechlm.demo.evaluate.joint_decoding", lambda *args: {})
    metrics = evaluate_understanding(None, None, manifests, ("transcribe", "slu_transcript"), seed=0, limit=None,
                                     num_beams=4)["slu_transcript"]
    assert calls == [4, 1]  # the held answers' beams, then free decoding's best
    assert (metrics["intent_accuracy"], metrics["best_beam"]["intent_accuracy"]) == (1.0, 0.0)
    assert metrics["rows"][0]["output"] == right


def test_free_decoding_is_left_out_when_asked(monkeypatch, tmp_path):
    # benchmarks/quoted_beams.py decodes at 8 beams: the free decoding beside would double its time for nothing.
    import speechlm.inference
    from speechlm.demo.evaluate import evaluate_understanding

    calls = []
    monkeypatch.setattr(speechlm.inference, "transcribe_arrays",
                        lambda model, processor, audios, **kwargs: calls.append(kwargs) or ["{}"] * len(audios))
    monkeypatch.setattr("speechlm.demo.evaluate.joint_decoding", lambda *args: {})
    results = evaluate_understanding(None, None, one_held_out_sentence(tmp_path), ("transcribe", "slu"), seed=0,
                                     limit=None, free=False)
    assert len(calls) == 1 and "json_schema" in calls[0] and "free" not in results["slu"]


def test_each_question_is_held_to_the_values_of_its_own_slot():
    from speechlm.demo.evaluate import held_structure
    from speechlm.demo.understanding import answer_pattern
    from tests.demo.test_understanding import ALARM, FLIGHT

    assert held_structure("qa", [ALARM, FLIGHT]) == {"regex": [answer_pattern(ALARM), answer_pattern(FLIGHT)]}


def test_each_transcript_first_question_is_held_to_its_slots_values_quoted_from_its_words():
    from speechlm.demo.evaluate import held_structure
    from speechlm.demo.understanding import answer_pattern, qa_transcript_schema
    from tests.demo.test_understanding import ALARM, FLIGHT

    held = held_structure("qa_transcript", [ALARM, FLIGHT, ALARM])
    assert held["json_schema"] == [qa_transcript_schema(answer_pattern(u), quoted=True) for u in (ALARM, FLIGHT, ALARM)]
    assert held["json_schema"][0] is held["json_schema"][2]  # one grammar per slot kind, not one per clip


def test_the_cascade_holds_each_answer_to_its_own_pattern(model_dirs):
    """The cascade anchor gets the same per-question constraint as the end-to-end model (an untrained decoder's
    free answers match neither pattern)."""
    import re

    from speechlm.demo.evaluate import cascade_answers

    patterns = ["(yes|no)", "[0-9]{2}", "(yes|no)"]
    queries = [("set an alarm", "Is there an alarm?"), ("call bob", "How many?"), ("play jazz", "Is it jazz?")]
    answers = cascade_answers((str(model_dirs("decoder", "gpt2")), None), "qa", queries, [], batch_size=2,
                              regex=patterns)
    assert all(re.fullmatch(pattern, answer) for pattern, answer in zip(patterns, answers)), answers


def test_slu_transcript_answers_decode_their_transcript_jointly_at_the_weight_the_model_carries(build):
    from speechlm.demo.evaluate import joint_decoding
    from speechlm.joint_ctc import json_string_span

    processor, model = build("whisper", "qwen2")
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    assert joint_decoding(model, processor, "slu_transcript") == {}  # no weight saved: the LLM alone
    model.config.ctc_head["joint_weight"] = 0.5
    expected = {"joint_ctc_weight": 0.5, "joint_ctc_span": json_string_span(processor.tokenizer)}
    assert joint_decoding(model, processor, "slu_transcript") == expected
    assert joint_decoding(model, processor, "slu") == joint_decoding(model, processor, "qa") == {}


def test_transcript_first_answers_to_questions_decode_their_transcript_jointly(build):
    from speechlm.demo.evaluate import joint_decoding
    from speechlm.joint_ctc import json_string_span

    processor, model = build("whisper", "qwen2")
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    model.config.ctc_head["joint_weight"] = 0.5
    expected = {"joint_ctc_weight": 0.5, "joint_ctc_span": json_string_span(processor.tokenizer)}
    assert joint_decoding(model, processor, "qa_transcript") == expected


@pytest.mark.parametrize("encoder", ["wav2vec2-layer", "whisper"])
def test_the_ctc_heads_transcripts_of_a_batch_equal_those_of_each_clip_alone(build, encoder):
    """A padded batch-mate must not change what the head reads: its padded audio tokens are past each clip's length."""
    from speechlm.demo.evaluate import ctc_head_transcripts
    from tests.conftest import make_clips

    processor, model = build(encoder, "llama")
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    clips = make_clips()
    batched = ctc_head_transcripts(model, processor, clips, batch_size=3)
    alone = [ctc_head_transcripts(model, processor, [clip])[0] for clip in clips]
    assert batched == alone and all(batched), batched

"""Joint CTC/LLM decoding (`speechlm.joint_ctc`, `SpeechLMModel.generate(joint_ctc_weight=...)`): the prefix scores are
CTC's own likelihood, tokens the head cannot hear are never written, beams keep their states, and batched decoding
equals one clip at a time."""

from __future__ import annotations

import json

import pytest
import torch

from speechlm.joint_ctc import CTCPrefixScorer, json_string_span
from tests.conftest import make_clips

EOS, VOCAB = 99, 100
CLASSES = [10, 11, 12, 13, 14]  # LLM token ids of the head's classes 1..5 (class 0 is blank)


def scorer(frames: int = 12, seed: int = 0, weight: float = 1.0, **kwargs) -> CTCPrefixScorer:
    log_probs = torch.randn(1, frames, 1 + len(CLASSES), generator=torch.Generator().manual_seed(seed)).log_softmax(-1)
    kwargs.setdefault("candidates", VOCAB)
    return CTCPrefixScorer(log_probs, torch.tensor([frames]), weight, EOS, torch.tensor(CLASSES), **kwargs)


def test_the_steps_of_a_whole_answer_sum_to_its_ctc_log_likelihood():
    prefix_scorer, answer = scorer(), [11, 11, 13]
    total, ids = 0.0, torch.zeros(1, 0, dtype=torch.long)
    for token in [*answer, EOS]:
        step = prefix_scorer(ids, torch.zeros(1, VOCAB))  # a flat LLM: weight 1 leaves CTC alone
        total += float(step[0, token])
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    targets = torch.tensor([[CLASSES.index(t) + 1 for t in answer]])
    expected = -torch.nn.functional.ctc_loss(prefix_scorer.log_probs.transpose(0, 1), targets, torch.tensor([12]),
                                             torch.tensor([3]), reduction="sum")
    assert total == pytest.approx(float(expected), abs=1e-4)


def test_tokens_the_head_has_no_class_for_and_tokens_the_llm_ranks_low_are_never_chosen():
    llm = torch.zeros(1, VOCAB)
    llm[0, [5, 10, 11]] = torch.tensor([9.0, 3.0, 2.0])  # token 5: the LLM's favourite, but the head cannot hear it
    step = scorer(candidates=3, head_candidates=0)(torch.zeros(1, 0, dtype=torch.long), llm)
    finite = torch.isfinite(step[0]).nonzero().view(-1).tolist()
    assert finite == [10, 11, EOS]


def test_beam_rows_are_matched_to_their_prefix_after_reordering():
    log_probs = scorer().log_probs.expand(2, -1, -1)
    prefix_scorer = CTCPrefixScorer(log_probs[:1], torch.tensor([12]), 0.5, EOS, torch.tensor(CLASSES),
                                    candidates=VOCAB)
    llm = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    prefix_scorer(torch.zeros(2, 0, dtype=torch.long), llm)  # two beams of one clip
    in_order = prefix_scorer(torch.tensor([[10], [12]]), llm).clone()
    prefix_scorer(torch.zeros(2, 0, dtype=torch.long), llm)
    swapped = prefix_scorer(torch.tensor([[12], [10]]), llm.flip(0))  # the beam search reordered its rows
    assert torch.equal(swapped, in_order.flip(0))


def test_clips_of_different_lengths_score_together_as_each_alone_and_padding_is_never_read():
    lengths, generator = [12, 5, 3], torch.Generator().manual_seed(2)
    log_probs = torch.randn(3, 12, 1 + len(CLASSES), generator=generator).log_softmax(-1)
    padded = log_probs.clone()
    for clip, length in enumerate(lengths):
        padded[clip, length:] = float("nan")  # audio tokens past a clip's end
    together = CTCPrefixScorer(padded, torch.tensor(lengths), 0.5, EOS, torch.tensor(CLASSES), candidates=VOCAB)
    alone = [CTCPrefixScorer(log_probs[c : c + 1, :n], torch.tensor([n]), 0.5, EOS, torch.tensor(CLASSES),
                             candidates=VOCAB) for c, n in enumerate(lengths)]
    llm = torch.randn(3, VOCAB, generator=generator)
    ids = torch.zeros(3, 0, dtype=torch.long)
    for prefix in ([11], [13], [10]):  # three steps, each row extending its prefix by the same tokens
        batched = together(ids, llm)
        single = torch.cat([one(ids[c : c + 1], llm[c : c + 1]) for c, one in enumerate(alone)])
        torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
        ids = torch.cat([ids, torch.tensor([prefix] * 3)], 1)


def test_a_prefix_longer_than_the_clip_can_hold_gets_the_llm_scores_not_nan():
    prefix_scorer, llm = scorer(frames=1, weight=0.5), torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    prefix_scorer(torch.zeros(1, 0, dtype=torch.long), llm)
    prefix_scorer(torch.tensor([[11]]), llm)
    step = prefix_scorer(torch.tensor([[11, 13]]), llm)  # two labels cannot fit one audio token: CTC says -inf
    torch.testing.assert_close(step, llm.log_softmax(-1))


def test_with_a_span_the_head_scores_only_between_its_opening_and_closing_tokens():
    opening, close = [20, 21], 22
    spanned, plain = scorer(weight=0.5, span=(opening, [close])), scorer(weight=0.5)
    llm = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(spanned(torch.tensor([[20]]), llm), llm.log_softmax(-1))  # not open yet
    half = 0.5 * llm.log_softmax(-1)[0]
    for ids, plain_ids in (([*opening], []), ([*opening, 11], [11])):
        inside, expected = spanned(torch.tensor([ids]), llm), plain(torch.tensor([plain_ids]), llm)
        # The closing token gets end-of-sequence's CTC score (beside its own LLM score).
        assert float(inside[0, close] - half[close]) == pytest.approx(float(expected[0, EOS] - half[EOS]))
        assert torch.equal(inside[0, :20], expected[0, :20]) and inside[0, EOS] == float("-inf")
    closed = spanned(torch.tensor([[*opening, 11, close]]), llm)
    torch.testing.assert_close(closed, llm.log_softmax(-1))  # after the span: the LLM alone


def test_a_weight_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match=r"CTC weight must be in \(0, 1\]"):
        scorer().__class__(torch.zeros(1, 2, 3), torch.tensor([2]), 1.5, EOS)


def test_the_heads_scores_of_every_next_class_equal_the_recursions_for_each_prefix():
    lengths, generator = [12, 7], torch.Generator().manual_seed(5)
    log_probs = torch.randn(2, 12, 1 + len(CLASSES), generator=generator).log_softmax(-1)
    prefix_scorer = CTCPrefixScorer(log_probs, torch.tensor(lengths), 0.5, EOS, torch.tensor(CLASSES))
    r_n, r_b, _ = zip(*(prefix_scorer._empty_state(clip) for clip in (0, 1)))
    clips, every = torch.tensor([0, 1]), torch.arange(1, 1 + len(CLASSES)).expand(2, -1)
    last = torch.tensor([-1, -1])
    r_n, r_b = torch.stack(r_n), torch.stack(r_b)
    for label in (2, 2, 4):  # the empty prefix, then one ending in class 2, then a repeat of it, then class 4
        _, _, psi = prefix_scorer._extend(clips, r_n, r_b, last, every)
        torch.testing.assert_close(prefix_scorer.prefix_scores(clips, r_n, r_b, last)[:, 1:], psi)
        new_n, new_b, _ = prefix_scorer._extend(clips, r_n, r_b, last, torch.tensor([[label], [label]]))
        r_n, r_b, last = new_n[:, :, 0], new_b[:, :, 0], torch.tensor([label, label])


def test_the_head_proposes_the_token_it_hears_where_the_llm_ranks_it_low():
    log_probs = torch.full((1, 4, 1 + len(CLASSES)), -9.0)
    log_probs[0, :, 0] = 0.0
    log_probs[0, 1, 0], log_probs[0, 1, 4] = -9.0, 0.0  # blank, then class 4 (token 13), then blanks
    llm = torch.zeros(1, VOCAB)
    llm[0, 10] = 5.0  # the LLM's one candidate: token 10
    first = torch.zeros(1, 0, dtype=torch.long)
    without = CTCPrefixScorer(log_probs, torch.tensor([4]), 0.5, EOS, torch.tensor(CLASSES), candidates=1,
                              head_candidates=0)
    with_head = CTCPrefixScorer(log_probs, torch.tensor([4]), 0.5, EOS, torch.tensor(CLASSES), candidates=1,
                                head_candidates=1)
    assert without(first, llm)[0, 13] == float("-inf")
    assert with_head(first, llm)[0].argmax() == 13


def test_the_heads_proposals_are_the_same_scored_a_few_rows_at_a_time(monkeypatch):
    import speechlm.joint_ctc as joint_ctc

    lengths, generator = [12, 9, 5], torch.Generator().manual_seed(6)
    log_probs = torch.randn(3, 12, 1 + len(CLASSES), generator=generator).log_softmax(-1)
    prefix_scorer = CTCPrefixScorer(log_probs, torch.tensor(lengths), 0.5, EOS, torch.tensor(CLASSES),
                                    head_candidates=3)
    r_n, r_b, _ = zip(*(prefix_scorer._empty_state(clip) for clip in range(3)))
    prefixes = (torch.arange(3), torch.stack(r_n), torch.stack(r_b), torch.tensor([-1, -1, -1]))  # empty prefixes
    whole = prefix_scorer.proposals(*prefixes)
    monkeypatch.setattr(joint_ctc, "PROPOSAL_ELEMENTS", 12 * (1 + len(CLASSES)))  # one row at a time
    assert prefix_scorer.proposals(*prefixes) == whole and len({tuple(p) for p in whole}) > 1


def test_a_negative_number_of_head_candidates_is_refused():
    with pytest.raises(ValueError, match="head_candidates >= 0"):
        scorer(head_candidates=-1)


@pytest.fixture
def model_with_head(build):
    processor, model = build("whisper", "llama")
    model.add_ctc_head(list(range(3, 60)), processor.tokenizer.all_special_ids)
    return processor, model


def test_joint_decoding_batched_equals_one_clip_at_a_time(model_with_head):
    processor, model = model_with_head
    clips = make_clips((1.0, 0.4, 0.7))
    kwargs = dict(max_new_tokens=6, do_sample=False, joint_ctc_weight=0.5)
    batched = model.generate(**processor(clips), **kwargs)
    for i, clip in enumerate(clips):
        alone = model.generate(**processor([clip]), **kwargs)[0].tolist()
        assert batched[i].tolist()[: len(alone)] == alone


def test_joint_decoding_with_the_heads_candidates_batched_equals_one_clip_at_a_time(model_with_head):
    processor, model = model_with_head
    clips = make_clips((1.0, 0.4, 0.7))
    kwargs = dict(max_new_tokens=6, do_sample=False, joint_ctc_weight=0.5, joint_ctc_head_candidates=8)
    batched = model.generate(**processor(clips), **kwargs)
    for i, clip in enumerate(clips):
        alone = model.generate(**processor([clip]), **kwargs)[0].tolist()
        assert batched[i].tolist()[: len(alone)] == alone


def test_joint_decoding_takes_the_head_candidates_saved_with_the_model(model_with_head):
    processor, model = model_with_head
    batch = processor(make_clips((1.0, 0.4, 0.7)))
    kwargs = dict(max_new_tokens=6, do_sample=False, joint_ctc_weight=0.9)
    proposing = model.generate(**batch, **kwargs, joint_ctc_head_candidates=8)
    model.config.ctc_head["head_candidates"] = 0  # as `speechlm transcribe --joint-ctc-head-candidates 0` sets it
    saved = model.generate(**batch, **kwargs)
    assert torch.equal(saved, model.generate(**batch, **kwargs, joint_ctc_head_candidates=0))
    assert not torch.equal(saved, proposing)


def test_joint_decoding_writes_only_tokens_the_head_can_hear(model_with_head):
    processor, model = model_with_head
    for num_beams in (1, 3):
        tokens = model.generate(**processor(make_clips((0.6, 0.9))), max_new_tokens=6, do_sample=False,
                                num_beams=num_beams, joint_ctc_weight=0.3)
        allowed = set(range(3, 60)) | {model.generation_config.eos_token_id, model.generation_config.pad_token_id}
        assert set(tokens.reshape(-1).tolist()) <= allowed


def test_joint_decoding_changes_what_the_llm_alone_writes(model_with_head):
    processor, model = model_with_head
    batch = processor(make_clips((1.0, 0.4, 0.7)))
    alone = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert not torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False, joint_ctc_weight=0.9), alone)


def test_joint_decoding_without_a_ctc_head_is_a_clear_error(build):
    processor, model = build("whisper", "llama")
    with pytest.raises(ValueError, match="joint_ctc_weight needs a CTC head"):
        model.generate(**processor(make_clips((0.5,))), max_new_tokens=2, joint_ctc_weight=0.3)


SPAN_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["transcript", "intent"],
               "properties": {"transcript": {"type": "string", "maxLength": 12}, "intent": {"enum": ["call", "play"]}},
               "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


def test_json_string_span_opens_where_the_answer_starts_and_closes_on_its_quote(build):
    tokenizer = build("whisper", "qwen2")[0].tokenizer
    opening, closing = json_string_span(tokenizer)
    ids = tokenizer.encode('{"transcript": "call home", "intent": "call"}', add_special_tokens=False)
    after = ids[len(opening):]
    first_close = next(i for i, token in enumerate(after) if token in closing)
    assert ids[: len(opening)] == opening and tokenizer.decode(after[:first_close]) == "call home"


def test_joint_decoding_of_a_json_transcript_field_keeps_the_schema_and_the_heads_tokens(build):
    from speechlm.inference.decoding import transcribe_arrays

    processor, model = build("whisper", "qwen2")
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    opening, closing = json_string_span(processor.tokenizer)
    answers = transcribe_arrays(model, processor, make_clips((0.6, 0.9)), max_new_tokens=60, json_schema=SPAN_SCHEMA,
                                joint_ctc_weight=0.9, joint_ctc_span=(opening, closing))
    for answer in answers:
        assert json.loads(answer)["intent"] in ("call", "play")
        # The field as written, JSON escapes and all (the head may write a backslash, a class of this tiny head).
        written = answer.removeprefix('{"transcript": "').split('", "intent"')[0]
        assert set(processor.tokenizer.encode(written, add_special_tokens=False)) <= set(range(3, 80))


def test_a_span_without_a_joint_weight_is_a_clear_error_not_a_silent_no_op(model_with_head):
    processor, model = model_with_head
    with pytest.raises(ValueError, match="joint_ctc_span needs a joint_ctc_weight > 0"):
        model.generate(**processor(make_clips((0.5,))), max_new_tokens=2, joint_ctc_span=([5], [6]))


def test_head_candidates_without_a_joint_weight_are_a_clear_error_not_a_silent_no_op(model_with_head):
    processor, model = model_with_head
    with pytest.raises(ValueError, match="joint_ctc_head_candidates needs a joint_ctc_weight > 0"):
        model.generate(**processor(make_clips((0.5,))), max_new_tokens=2, joint_ctc_head_candidates=4)


def test_a_schema_whose_every_answer_opens_with_a_transcript_gets_that_fields_span(build):
    from speechlm.joint_ctc import schema_transcript_span

    tokenizer = build("whisper", "qwen2")[0].tokenizer
    either = {"anyOf": [SPAN_SCHEMA, {**SPAN_SCHEMA, "required": ["transcript"]}], "x-guidance": {"key_separator": ":"}}
    assert schema_transcript_span(tokenizer, SPAN_SCHEMA) == json_string_span(tokenizer)
    assert schema_transcript_span(tokenizer, either) == json_string_span(tokenizer, '{"transcript":"')


def test_a_transcript_defined_by_reference_gets_the_same_span(build):
    from speechlm.joint_ctc import schema_transcript_span

    tokenizer = build("whisper", "qwen2")[0].tokenizer
    referred = {**SPAN_SCHEMA, "properties": {**SPAN_SCHEMA["properties"], "transcript": {"$ref": "#/$defs/said"}},
                "$defs": {"said": SPAN_SCHEMA["properties"]["transcript"]}}
    assert schema_transcript_span(tokenizer, referred) == json_string_span(tokenizer)


def test_a_schema_that_does_not_open_with_a_transcript_string_gets_no_span(build):
    from speechlm.joint_ctc import schema_transcript_span

    tokenizer = build("whisper", "qwen2")[0].tokenizer
    properties = SPAN_SCHEMA["properties"]
    second = {**SPAN_SCHEMA, "properties": {"intent": properties["intent"], "transcript": properties["transcript"]}}
    number = {**SPAN_SCHEMA, "properties": {**properties, "transcript": {"type": "integer"}}}
    one_without = {"anyOf": [SPAN_SCHEMA, {"type": "object", "properties": {"intent": properties["intent"]}}]}
    for schema in (second, number, one_without, {"type": "object"}, None):
        assert schema_transcript_span(tokenizer, schema) is None, schema

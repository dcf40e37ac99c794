"""Splicing audio into the text (speechlm.merging): the pure function on hand-made tensors, and through the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speechlm.merging import MergedInputs, merge_audio_and_text, position_ids_from_mask
from speechlm.modeling import IGNORE_INDEX
from tests.conftest import make_clips
from tests.test_modeling import _trim

AUDIO = 9  # the audio placeholder id of these hand-made batches
DIM = 4


def _parts(seed: int = 0):
    """An embedding table, start/end embeddings and two clips of 3 and 1 real tokens (the second padded)."""
    torch.manual_seed(seed)
    embed = nn.Embedding(16, DIM)
    start, end = torch.randn(DIM), torch.randn(DIM)
    audio = torch.randn(2, 3, DIM)
    return embed, start, end, audio, torch.tensor([3, 1])


def _merge(parts, input_ids, text_mask=None, labels=None, padding_side=None, layout="placeholder"):
    embed, start, end, audio, lengths = parts
    return merge_audio_and_text(embed, start, end, audio, lengths, input_ids, text_mask, labels, padding_side,
                                audio_token_id=AUDIO, audio_layout=layout)


def test_each_placeholder_becomes_start_clip_end_in_place():
    parts = _parts()
    embed, start, end, audio, _ = parts
    ids = torch.tensor([[5, AUDIO, 6], [AUDIO, 7, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    merged = _merge(parts, ids, mask)
    assert isinstance(merged, MergedInputs)
    with torch.no_grad():
        first = torch.stack([embed.weight[5], start, *audio[0], end, embed.weight[6]])
        second = torch.stack([start, audio[1, 0], end, embed.weight[7]])
    torch.testing.assert_close(merged.inputs_embeds[0], first, atol=0, rtol=0)
    assert merged.attention_mask.tolist() == [[1] * 7, [0, 0, 0, 1, 1, 1, 1]]  # no labels: padded on the left
    torch.testing.assert_close(merged.inputs_embeds[1, 3:], second, atol=0, rtol=0)
    assert not merged.inputs_embeds[1, :3].any()  # pad slots are zero
    assert merged.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 2, 3]]
    assert merged.labels is None


def test_left_and_right_padding_give_each_sample_the_same_tokens_and_positions():
    parts = _parts(1)
    ids = torch.tensor([[5, 6, AUDIO, 7], [AUDIO, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7], [IGNORE_INDEX, 8, IGNORE_INDEX, 0]])
    right = _merge(parts, ids, mask, labels)  # labels: right padding by default
    left = _merge(parts, ids, mask, labels, padding_side="left")
    assert right.attention_mask[:, 0].all() and left.attention_mask[:, -1].all()
    for row in range(2):
        keep_right, keep_left = right.attention_mask[row].bool(), left.attention_mask[row].bool()
        torch.testing.assert_close(left.inputs_embeds[row][keep_left], right.inputs_embeds[row][keep_right],
                                   atol=0, rtol=0)
        assert left.position_ids[row][keep_left].tolist() == right.position_ids[row][keep_right].tolist()
        assert left.labels[row][keep_left].tolist() == right.labels[row][keep_right].tolist()
    # Labels survive on text only: start, audio, end and padding are all ignored.
    assert right.labels[0].tolist() == [IGNORE_INDEX] * 7 + [7]
    assert right.labels[1].tolist() == [IGNORE_INDEX] * 3 + [8] + [IGNORE_INDEX] * 4


def test_the_prefix_layout_is_a_placeholder_in_front_of_the_text():
    parts = _parts(2)
    text = torch.tensor([[5, 6], [7, 0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    prefix = _merge(parts, text, mask, layout="prefix")
    placeholder = _merge(parts, torch.cat([torch.full((2, 1), AUDIO), text], 1),
                         torch.cat([torch.ones(2, 1, dtype=torch.long), mask], 1))
    torch.testing.assert_close(prefix.inputs_embeds, placeholder.inputs_embeds, atol=0, rtol=0)
    assert prefix.attention_mask.tolist() == placeholder.attention_mask.tolist()
    audio_only = _merge(parts, None, layout="prefix")  # no text at all: just start + clip + end
    assert audio_only.attention_mask.sum(1).tolist() == [5, 3]


def test_mismatched_counts_and_shapes_are_value_errors():
    parts = _parts()
    with pytest.raises(ValueError, match=r"found 1 audio placeholder\(s\) in input_ids but 2 clip\(s\)"):
        _merge(parts, torch.tensor([[5, AUDIO], [6, 7]]))
    with pytest.raises(ValueError, match="found 3 audio placeholder"):
        _merge(parts, torch.tensor([[AUDIO, AUDIO], [AUDIO, 7]]))
    # A placeholder under the text mask's padding is not a placeholder.
    with pytest.raises(ValueError, match="found 1 audio placeholder"):
        _merge(parts, torch.tensor([[AUDIO, 5], [6, AUDIO]]), torch.tensor([[1, 1], [1, 0]]))
    with pytest.raises(ValueError, match="2 audio clip.* but 3 text"):
        _merge(parts, torch.tensor([[5], [6], [7]]), layout="prefix")
    with pytest.raises(ValueError, match="contain the audio token but the model uses the prefix"):
        _merge(parts, torch.tensor([[AUDIO], [6]]), layout="prefix")
    with pytest.raises(ValueError, match="placeholder layout needs input_ids"):
        _merge(parts, None)
    with pytest.raises(ValueError, match="decoder_attention_mask shape"):
        _merge(parts, torch.tensor([[AUDIO], [AUDIO]]), torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        _merge(parts, torch.tensor([[AUDIO], [AUDIO]]), padding_side="middle")


def test_position_ids_count_only_attended_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_the_model_method_is_the_function_with_the_models_embeddings(build, clips):
    processor, model = build("whisper", "qwen2")
    batch = processor(clips, text=["a", "b", "c"])
    with torch.no_grad():
        embeds, lengths = model.get_audio_features(batch["input_features"], batch["attention_mask"])
        method = model.merge_audio_and_text(embeds, lengths, batch["input_ids"], batch["decoder_attention_mask"],
                                            batch["labels"])
        function = merge_audio_and_text(
            model.get_input_embeddings(), model.audio_start, model.audio_end, embeds, lengths, batch["input_ids"],
            batch["decoder_attention_mask"], batch["labels"], audio_token_id=model.config.audio_token_id,
            audio_layout=model.config.audio_layout,
        )
    for name in ("inputs_embeds", "attention_mask", "position_ids", "labels"):
        torch.testing.assert_close(getattr(method, name), getattr(function, name), atol=0, rtol=0)


def test_labels_without_text_are_rejected(build, clips):
    processor, model = build("wav2vec2-layer", "llama")
    batch = processor(clips, text=["a", "b", "c"])
    batch["labels"][1] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] contain no text tokens"):
        model(**batch)


def test_placeholder_layout_with_several_clips_per_sample_and_a_chat_template(build, clips):
    processor, model = build("whisper", "qwen2", layout="placeholder")
    processor.use_chat_template = True
    tokenizer = processor.tokenizer
    audio = "<|audio|>"
    texts = [f"first {audio} then {audio} compare them", f"{audio} what is said"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True) for t in texts]
    features = processor.extract_audio(clips)
    text = processor.encode_text(prompts)
    with torch.no_grad():
        batched = model.generate(**features, **text, max_new_tokens=5, do_sample=False)
        first = model.generate(**{k: v[:2] for k, v in features.items()},
                               **processor.encode_text(prompts[:1]), max_new_tokens=5, do_sample=False)
        second = model.generate(**_trim({**{k: v[2:] for k, v in features.items()},
                                        **processor.encode_text(prompts[1:])}), max_new_tokens=5, do_sample=False)
    assert batched[0].tolist()[: first.shape[1]] == first[0].tolist()
    assert batched[1].tolist()[: second.shape[1]] == second[0].tolist()
    merged = model.prepare_inputs(**features, **text)
    lengths = model.audio_output_lengths(features["attention_mask"].sum(-1))
    expected = (text["decoder_attention_mask"].sum(1) - 1 - torch.tensor([1, 0])) + torch.tensor(
        [lengths[0] + lengths[1] + 4, lengths[2] + 2]
    )
    assert merged.attention_mask.sum(1).tolist() == (expected + torch.tensor([0, 0])).tolist()
    with pytest.raises(ValueError, match="found 3 audio placeholder"):
        model.generate(**{k: v[:2] for k, v in features.items()}, **text, max_new_tokens=2)


# ------------------------------------------------------------------ processor-expanded placeholders (masked_scatter)
@pytest.mark.parametrize("family", ["whisper", "wav2vec2-layer"])
def test_expanded_placeholders_give_the_same_loss_and_logits(build, family):
    processor, model = build(family, "llama", layout="placeholder")
    clips, texts = make_clips((0.55, 0.3, 0.8)), ["one two", "three", "four five six"]
    one, expanded = processor(clips, text=texts), processor.expanding_for(model.config)(clips, text=texts)
    with torch.no_grad():
        a, b = model(**one), model(**expanded)
    torch.testing.assert_close(a.loss, b.loss)
    real = expanded["decoder_attention_mask"].bool()  # both right-padded: the same layout, position for position
    torch.testing.assert_close(a.logits[real], b.logits[real])


@pytest.mark.parametrize("family", ["whisper", "wav2vec2-layer"])
def test_expanded_placeholders_generate_what_one_placeholder_does(build, family):
    processor, model = build(family, "qwen2", layout="placeholder")
    clips = make_clips((0.55, 0.3, 0.8))
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        one = model.generate(**processor(clips), **kwargs)
        expanded = model.generate(**processor.expanding_for(model.config)(clips), **kwargs)
    assert torch.equal(one, expanded)


def test_expanded_batch_generates_what_each_clip_generates_alone(build):
    processor, model = build("whisper", "llama", layout="placeholder")
    processor = processor.expanding_for(model.config)
    clips = make_clips((0.55, 0.3, 0.8))
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        batched = model.generate(**processor(clips), **kwargs)
        alone = [model.generate(**processor([clip]), **kwargs)[0] for clip in clips]
    for row, tokens in enumerate(alone):
        assert torch.equal(batched[row, : len(tokens)], tokens)


def test_a_wrong_expanded_count_names_both_counts(build):
    processor, model = build("whisper", "llama", layout="placeholder")
    batch = processor.expanding_for(model.config)(make_clips((0.55,)))
    audio_id = model.config.audio_token_id
    first = int((batch["input_ids"][0] == audio_id).nonzero()[0])
    batch["input_ids"] = torch.cat([batch["input_ids"][:, :first], batch["input_ids"][:, first + 1:]], dim=1)
    batch["decoder_attention_mask"] = batch["decoder_attention_mask"][:, 1:]
    with pytest.raises(ValueError, match="when the processor expands them"):
        model(**batch)

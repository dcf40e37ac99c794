"""The dataset/collator pair: prompts and tasks, batches equal to the processor's, chat rows, the prefix layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechlm.data.dataset import TEXT_ROW_KEYS, SpeechLMCollator, SpeechLMDataset
from speechlm.data.encoder_cache import EncoderCache
from speechlm.data.manifests import read_manifest


def test_dataset_prompts_and_tasks(corpus):
    _, manifest, _ = corpus
    records = list(read_manifest(manifest))
    records[0]["prompt"], records[1]["task"] = "own prompt", "translate"
    dataset = SpeechLMDataset(records, 16000, task_prompts={"translate": "Translate it."})
    assert [dataset[i]["prompt"] for i in range(3)] == ["own prompt", "Translate it.", None]
    assert dataset.lengths == [550, 300, 800]
    records[2]["task"] = "summarise"
    with pytest.raises(KeyError, match="task 'summarise' has no prompt"):
        SpeechLMDataset(records, 16000, task_prompts={"translate": "Translate it."})


@pytest.mark.parametrize(("encoder", "layout"), [("whisper", "prefix"), ("wav2vec2-layer", "placeholder")])
def test_collator_equals_processor(build, corpus, encoder, layout):
    processor, _ = build(encoder, "qwen2", layout=layout)
    _, manifest, rows = corpus
    records = list(read_manifest(manifest))
    records[2]["prompt"] = "another prompt"
    dataset = SpeechLMDataset(records, processor.sampling_rate)
    features = [dataset[i] for i in range(3)]
    batch = SpeechLMCollator(processor)(features)
    expected = processor([f["audio"] for f in features], text=[r["text"] for r in rows],
                         prompt=[None, None, "another prompt"])
    assert batch.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("chat_template", [False, True])
def test_chat_manifest_trains_one_step_through_the_collator(build, chat_manifest, chat_template):
    processor, model = build("whisper", "qwen2", layout="placeholder", dtype=torch.float32)
    processor.use_chat_template = chat_template
    dataset = SpeechLMDataset(read_manifest(chat_manifest), processor.sampling_rate, audio_layout="placeholder")
    batch = SpeechLMCollator(processor)([dataset[i] for i in range(len(dataset))])
    model.train()
    model.freeze_encoder()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.multi_modal_projector.parameters())
    optimizer.step()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_collator_encodes_each_row_of_a_mixed_batch_as_alone(build, chat_manifest):
    processor, _ = build("wav2vec2-layer", "qwen2", layout="placeholder")
    dataset = SpeechLMDataset(read_manifest(chat_manifest), processor.sampling_rate)
    items = [dataset[i] for i in range(3)]
    batch = SpeechLMCollator(processor)(items)
    alone = [processor.apply_chat_template(items[0]["messages"], return_labels=True),
             processor.apply_chat_template(items[1]["messages"], return_labels=True),
             processor(items[2]["audio"], text="play some jazz")]
    assert batch["attention_mask"].shape[0] == 4  # clips in row-major order: 2 + 1 + 1
    clips = [0, 2, 3]
    for row, single in enumerate(alone):
        width = single["input_ids"].shape[1]
        for key in ("input_ids", "decoder_attention_mask", "labels"):
            torch.testing.assert_close(batch[key][row, :width], single[key][0], rtol=0, atol=0)
            assert not batch["decoder_attention_mask"][row, width:].any()
        frames = single["attention_mask"].shape[1]
        torch.testing.assert_close(batch["input_values"][clips[row], :frames], single["input_values"][0])


def test_chat_rows_refuse_the_encoder_cache(build, chat_manifest):
    processor, model = build("whisper", "qwen2")
    model.freeze_encoder()
    cache = EncoderCache.for_model(model, processor)
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: the encoder cache does not support chat rows"):
        SpeechLMDataset(read_manifest(chat_manifest), processor.sampling_rate, encoder_cache=cache)


def test_prefix_layout_dataset_refuses_chat_rows_without_one_clip(chat_manifest):
    with pytest.raises(ValueError, match=r"1 chat row\(s\) without exactly one audio clip, e\.g\. .*chat\.jsonl:1"):
        SpeechLMDataset(read_manifest(chat_manifest), 16000, audio_layout="prefix")


def cached_items(processor, texts, transcripts=None, lengths=(40, 25)):
    """Dataset items over an in-memory encoder cache filled by hand (no encoder run)."""
    records = [{"audio": np.full(160, i, np.float32), "sampling_rate": 16000, "text": text, "id": str(i),
                "transcript": (transcripts or texts)[i]} for i, text in enumerate(texts)]
    cache = EncoderCache("encoder")
    for record, n in zip(records, lengths, strict=True):
        cache.put(cache.key(record), torch.randn(n, 16).add(5))
    dataset = SpeechLMDataset(records, 16000, encoder_cache=cache)
    return cache, [dataset[i] for i in range(len(records))]


def test_collator_gives_the_ctc_head_the_transcript_when_the_answer_differs(build):
    processor, _ = build("whisper", "llama")
    cache, items = cached_items(processor, ["turn on the lights", '{"intent": "turn"}'], ["turn on the lights"] * 2)
    batch = SpeechLMCollator(processor, cache)(items)
    expected = processor.encode_text([processor.build_prompt(None)] * 2, ["turn on the lights"] * 2)["labels"]
    assert torch.equal(batch["ctc_labels"], expected)


def test_collator_adds_no_ctc_labels_when_every_text_is_the_transcript(build):
    processor, _ = build("whisper", "llama")
    cache, items = cached_items(processor, ["turn on the lights", "call mom"])
    assert "ctc_labels" not in SpeechLMCollator(processor, cache)(items)


def test_frame_masking_zeroes_whole_frames_and_channels_only(build):
    """SpecAugment on cached frames: masked frames/channels are all zero, the rest is the input, labels untouched."""
    processor, _ = build("whisper", "llama")
    cache, items = cached_items(processor, ["turn on the lights", "call mom"])
    plain = SpeechLMCollator(processor, cache)(items)
    masked = SpeechLMCollator(processor, cache, frame_masking=0.3)(items)
    frames, original = masked["encoder_frames"], plain["encoder_frames"]
    zero = frames == 0
    dropped_frames, dropped_channels = zero.all(-1), zero.all(-2)
    assert dropped_frames[0].any() and dropped_channels[0].any()
    assert not dropped_frames[0].all() and not dropped_channels[0].all()
    kept = ~dropped_frames[..., None] & ~dropped_channels[:, None, :]
    assert torch.equal(frames[kept], original[kept])  # whatever is not masked is the input, bit for bit
    assert torch.equal(masked["labels"], plain["labels"])


def test_given_lengths_replace_durations_for_batching(corpus):
    _, manifest, _ = corpus
    assert SpeechLMDataset(read_manifest(manifest), 16000, lengths=[7, 8, 9]).lengths == [7, 8, 9]


TEXT_EXAMPLES = [{"prompt": "Intent as JSON:", "text": f'{{"intent": "call", "contact": "{name}"}}',
                  "transcript": f"call {name} now"} for name in ("mom", "dad", "alice", "bob", "the office")]


def _drawn(processor, batch) -> list[str]:
    """The transcripts a batch's text rows read, in row order."""
    prompts = [processor.tokenizer.decode(ids[mask.bool()]) for ids, mask in
               zip(batch["text_input_ids"], batch["text_attention_mask"])]
    return [next(e["transcript"] for e in TEXT_EXAMPLES if e["transcript"] in prompt) for prompt in prompts]


def test_text_rows_read_the_words_where_the_clip_stands_and_learn_the_answer(build):
    processor, _ = build("whisper", "llama")
    cache, items = cached_items(processor, ["turn on the lights", "call mom"])
    batch = SpeechLMCollator(processor, cache, text_examples=TEXT_EXAMPLES, text_rows=3)(items)
    for row, transcript in enumerate(_drawn(processor, batch)):
        example = next(e for e in TEXT_EXAMPLES if e["transcript"] == transcript)
        expected = processor.encode_text([processor.build_prompt(example["prompt"], audio_text=transcript)],
                                         [example["text"]])
        width = int(batch["text_attention_mask"][row].sum())
        assert batch["text_input_ids"][row, :width].tolist() == expected["input_ids"][0].tolist()
        assert batch["text_labels"][row, :width].tolist() == expected["labels"][0].tolist()
    assert batch["encoder_frames"].shape[0] == 2  # the clips' rows are the batch's own


def test_text_rows_go_through_every_example_before_one_repeats(build):
    processor, _ = build("whisper", "llama")
    cache, items = cached_items(processor, ["turn on the lights", "call mom"])
    collator = SpeechLMCollator(processor, cache, text_examples=TEXT_EXAMPLES, text_rows=2, seed=3)
    drawn = [transcript for _ in range(5) for transcript in _drawn(processor, collator(items))]
    assert sorted(drawn[:5]) == sorted(e["transcript"] for e in TEXT_EXAMPLES)
    assert sorted(drawn[5:]) == sorted(e["transcript"] for e in TEXT_EXAMPLES)


def test_text_rows_join_a_chat_batch_too(build, chat_manifest):
    processor, _ = build("whisper", "qwen2", layout="placeholder")
    dataset = SpeechLMDataset(read_manifest(chat_manifest), processor.sampling_rate, audio_layout="placeholder")
    batch = SpeechLMCollator(processor, text_examples=TEXT_EXAMPLES, text_rows=2)([dataset[0]])
    assert batch["text_input_ids"].shape[0] == 2 and set(TEXT_ROW_KEYS) <= batch.keys()


def test_text_rows_without_examples_are_refused():
    with pytest.raises(ValueError, match="text_rows=4 needs text_examples"):
        SpeechLMCollator(None, text_rows=4)


def test_a_text_example_without_its_words_is_refused_by_position():
    examples = [TEXT_EXAMPLES[0], {**TEXT_EXAMPLES[1], "transcript": ""}]
    with pytest.raises(ValueError, match="text example 1 lacks transcript"):
        SpeechLMCollator(None, text_examples=examples, text_rows=1)

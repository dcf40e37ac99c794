"""The dataset/collator pair: prompts and tasks, batches equal to the processor's, chat rows, the prefix layout."""

from __future__ import annotations

import pytest
import torch

from speechlm.data.dataset import SpeechLMCollator, SpeechLMDataset
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

"""Manifests (errors with file:line, skip/raise), HF datasets, the dataset/collator pair, duration-grouped batches and
the frozen-encoder cache."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.data import (
    DurationGroupedSampler,
    EncoderCache,
    ManifestError,
    SpeechLMCollator,
    SpeechLMDataset,
    read_manifest,
    records_from_dataset,
)
from tests.conftest import make_clips


@pytest.fixture
def corpus(tmp_path):
    """Three clips in tmp/clips (one at 22.05 kHz) and a manifest with relative paths."""
    clips = make_clips()
    (tmp_path / "clips").mkdir()
    rows = []
    for index, clip in enumerate(clips):
        rate = 22050 if index == 1 else 16000
        if rate != 16000:
            import soxr

            clip = soxr.resample(clip, 16000, rate)
        sf.write(tmp_path / "clips" / f"{index}.wav", clip, rate)
        rows.append({"audio": f"clips/{index}.wav", "text": f"clip number {index}", "id": f"c{index}"})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path, manifest, rows


def test_manifest_resolves_relative_paths_and_probes_durations(corpus, tmp_path, monkeypatch):
    root, manifest, _ = corpus
    monkeypatch.chdir(tmp_path.parent)  # relative to the manifest, never to the working directory
    records = read_manifest(manifest)
    assert len(records) == 3 and not records.skipped
    assert records[0]["audio"] == str(root.resolve() / "clips" / "0.wav")
    assert records[1]["duration"] == pytest.approx(0.3, abs=1e-3)  # read from the 22.05 kHz file's header
    assert records[2]["id"] == "c2" and records[0]["prompt"] is None


def _bad_manifest(root) -> tuple:
    lines = [
        json.dumps({"audio": "clips/0.wav", "text": "good one"}),
        "{not json",
        json.dumps({"audio": "clips/1.wav"}),
        "",
        json.dumps({"audio": "clips/missing.wav", "text": "gone"}),
        json.dumps({"audio": "clips/2.wav", "text": 7}),
        json.dumps(["a", "list"]),
        json.dumps({"audio": "clips/2.wav", "text": "bad duration", "duration": -1}),
        json.dumps({"audio": "clips/2.wav", "text": "good two", "prompt": "spell it"}),
    ]
    (root / "empty.wav").write_bytes(b"")
    lines.append(json.dumps({"audio": "empty.wav", "text": "empty file"}))
    path = root / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, {2: "invalid JSON", 3: "missing 'text'", 5: "audio file not found", 6: "'text' must be a string",
                  7: "expected a JSON object", 8: "'duration' must be a positive", 10: "empty"}


def test_manifest_errors_name_file_and_line(corpus):
    root, _, _ = corpus
    path, expected = _bad_manifest(root)
    with pytest.raises(ManifestError) as info:
        read_manifest(path, on_error="raise")
    message = str(info.value)
    assert "7 unusable entries" in message
    for line, problem in expected.items():
        assert f"{path}:{line}: " in message and problem in message
    assert [issue.location for issue in info.value.issues] == [f"{path}:{line}" for line in expected]


def test_manifest_skip_reports_what_was_skipped(corpus, caplog):
    root, _, _ = corpus
    path, expected = _bad_manifest(root)
    with caplog.at_level(logging.WARNING, logger="speechlm.data"):
        manifest = read_manifest(path, on_error="skip")
    assert [r["text"] for r in manifest] == ["good one", "good two"]
    assert manifest[1]["prompt"] == "spell it"
    assert len(manifest.skipped) == len(expected)
    assert f"skipped {len(expected)} of 9 entries of {path}" in caplog.text
    assert f"{path}:3: missing 'text'" in caplog.text


def test_manifest_with_nothing_usable_fails_even_when_skipping(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio": "nope.wav", "text": "x"}\n')
    with pytest.raises(ManifestError, match="audio file not found"):
        read_manifest(path, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        read_manifest(path, on_error="ignore")
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "absent.jsonl")


def test_duration_filter_drops_and_reports(corpus, caplog):
    _, manifest, _ = corpus
    with caplog.at_level(logging.WARNING, logger="speechlm.data"):
        records = read_manifest(manifest, max_seconds=0.6)
    assert [r["id"] for r in records] == ["c0", "c1"]
    assert "longer than max_seconds" in str(records.skipped[0]) and "dropped 1 of 3" in caplog.text


def test_hf_dataset_records(corpus):
    import datasets

    root, _, rows = corpus
    paths = [str(root / row["audio"]) for row in rows]
    audio_column = datasets.Dataset.from_dict({"audio": paths, "text": ["a", "b", "c"]}).cast_column(
        "audio", datasets.Audio()
    )
    # Decoding an Audio column would need torchcodec; records read it undecoded (path/bytes) instead.
    records = records_from_dataset(audio_column, name="ds")
    assert [r["location"] for r in records] == ["ds[0]", "ds[1]", "ds[2]"]
    dataset = SpeechLMDataset(records, 16000)
    assert dataset[1]["audio"].shape == (int(0.3 * 16000),)  # 22.05 kHz file resampled to 16 kHz

    clip = make_clips()[0]
    decoded = datasets.Dataset.from_dict(
        {"audio": [{"array": clip, "sampling_rate": 16000}, {"array": [], "sampling_rate": 16000}],
         "sentence": ["decoded", "empty"]}
    )
    with pytest.raises(ManifestError, match=r"ds\[1\]: audio array must be 1-D and non-empty"):
        records_from_dataset(decoded, text_column="sentence", name="ds")
    records = records_from_dataset(decoded, on_error="skip", text_column="sentence")
    np.testing.assert_allclose(SpeechLMDataset(records, 16000)[0]["audio"], clip, atol=1e-6)

    plain = [{"audio": clip.astype(np.float64), "text": "plain"}]
    with pytest.raises(ManifestError, match="needs its 'sampling_rate'"):
        records_from_dataset(plain)
    assert records_from_dataset(plain, sampling_rate=16000)[0]["duration"] == pytest.approx(0.55)


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


def test_duration_grouped_sampler_is_a_function_of_the_epoch():
    lengths = np.random.default_rng(0).integers(500, 20_000, size=400).tolist()
    sampler = DurationGroupedSampler(4, lengths, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and sorted(first) == list(range(400)) and first != second

    def spread(order):  # mean duration range inside a batch of 4
        return np.mean([np.ptp([lengths[i] for i in order[k : k + 4]]) for k in range(0, 400, 4)])

    assert spread(first) < 0.2 * spread(list(range(400)))


def test_encoder_cache_gives_the_same_loss(build, corpus, tmp_path):
    processor, model = build("whisper", "qwen2")
    model.freeze_encoder()
    _, manifest, _ = corpus
    records = read_manifest(manifest)
    plain = SpeechLMDataset(records, processor.sampling_rate)
    reference = SpeechLMCollator(processor)([plain[i] for i in range(3)])
    for directory in (None, tmp_path / "frames"):
        cache = EncoderCache.for_model(model, processor, "disk" if directory else "memory", directory)
        cached_set = SpeechLMDataset(records, processor.sampling_rate, encoder_cache=cache)
        assert "audio" in cached_set[0]  # nothing cached yet
        assert cache.fill(model, processor, cached_set, batch_size=2, progress=False) == 3
        assert cache.fill(model, processor, cached_set, batch_size=2, progress=False) == 0  # computed once
        items = [cached_set[i] for i in range(3)]
        assert all("audio" not in item and "cache_key" in item for item in items)  # no audio decoded any more
        batch = SpeechLMCollator(processor, encoder_cache=cache)(items)
        assert set(batch) == {"encoder_frames", "encoder_frame_lengths", "input_ids", "decoder_attention_mask",
                              "labels"}
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).loss, model(**reference).loss)
    assert len(list((tmp_path / "frames").glob("*/*.safetensors"))) == 3


def test_encoder_cache_keys_follow_file_and_encoder(build, corpus):
    processor, model = build("whisper", "qwen2")
    model.freeze_encoder()
    _, manifest, _ = corpus
    record = read_manifest(manifest)[0]
    cache = EncoderCache.for_model(model, processor)
    key = cache.key(record)
    stat = os.stat(record["audio"])
    os.utime(record["audio"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.key(record) != key  # an edited file is a miss, never a stale hit
    with torch.no_grad():
        next(model.audio_tower.parameters()).add_(1.0)
    assert EncoderCache.for_model(model, processor).fingerprint != cache.fingerprint
    model.unfreeze_encoder()
    with pytest.raises(ValueError, match="encoder is being trained"):
        EncoderCache.for_model(model, processor)


def test_a_line_that_is_not_utf8_is_skipped_and_named_not_a_traceback(corpus):
    root, manifest, _ = corpus
    manifest.write_bytes(manifest.read_bytes() + b'{"audio": "clips/0.wav", "text": "caf\xe9"}\n')
    records = read_manifest(manifest, on_error="skip")
    assert len(records) == 3
    assert records.skipped[0].location == f"{manifest}:4" and "not UTF-8" in str(records.skipped[0])


def test_empty_transcripts_are_refused_and_an_all_empty_manifest_does_not_train(corpus):
    root, manifest, rows = corpus
    manifest.write_text("".join(json.dumps({**row, "text": "  "}) + "\n" for row in rows))
    with pytest.raises(ManifestError, match="empty 'text'"):
        read_manifest(manifest, on_error="skip")


# ------------------------------------------------------------------------------------------------------ chat rows
def _chat_row(*clips: str, question: str = "what did they say", answer: str = "call mom", **extra) -> dict:
    content = [{"type": "audio", "audio": clip} for clip in clips] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": content},
                         {"role": "assistant", "content": answer}], **extra}


@pytest.fixture
def chat_manifest(corpus):
    """Chat rows (two clips in one, a follow-up turn in another) beside a plain audio + text row."""
    root, _, _ = corpus
    follow_up = _chat_row("clips/1.wav", answer="seven thirty", task="qa")
    follow_up["messages"] += [{"role": "user", "content": "and the day"}, {"role": "assistant", "content": "monday"}]
    rows = [_chat_row("clips/0.wav", "clips/2.wav", answer="the second one", id="two"), follow_up,
            {"audio": "clips/2.wav", "text": "play some jazz", "id": "plain"}]
    path = root / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_chat_manifest_rows_resolve_paths_and_sum_durations(corpus, chat_manifest):
    root, _, _ = corpus
    records = read_manifest(chat_manifest)
    first = records[0]
    assert first["audio"] is None and first["id"] == "two" and first["text"] == "the second one"
    assert [part.source for part in first["messages"][1].clips] == [str(root.resolve() / "clips" / f"{i}.wav")
                                                                      for i in (0, 2)]
    assert first["duration"] == pytest.approx(0.55 + 0.8, abs=1e-3)
    assert records[1]["task"] == "qa" and records[1]["text"] == "monday" and records[2]["text"] == "play some jazz"


def test_chat_manifest_errors_name_file_line_and_part(corpus):
    root, _, _ = corpus
    lines = [
        _chat_row("clips/0.wav"),
        _chat_row("clips/missing.wav"),
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "clips/0.wav"}]}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {**_chat_row("clips/0.wav"), "text": "both"},
        {"messages": []},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]},
                      {"role": "assistant", "content": "x"}]},
    ]
    path = root / "bad_chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    expected = {2: "messages[1].content[0]: audio file not found", 3: "no assistant message",
                4: "messages[0]: unknown role 'robot'", 5: "cannot also have 'text'",
                6: "'messages': empty conversation", 7: "messages[0].content[0]: unknown content part type 'video'"}
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert [issue.location for issue in info.value.issues] == [f"{path}:{line}" for line in expected]
    for line, problem in expected.items():
        assert f"{path}:{line}: " in str(info.value) and problem in str(info.value)
    assert len(read_manifest(path, on_error="skip")) == 1


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

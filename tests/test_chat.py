"""`SpeechLMProcessor.apply_chat_template`: chats with audio parts -> the inputs `processor(...)` would build, labels on
the assistant's words only, several clips in the placeholder layout, and errors that name the bad part."""

from __future__ import annotations

import base64
import io
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm import SpeechLMProcessor
from speechlm.chat import ChatError
from speechlm.modeling import IGNORE_INDEX
from tests.conftest import make_clips


def _processor(processor: SpeechLMProcessor, chat_template: bool) -> SpeechLMProcessor:
    return SpeechLMProcessor(processor.feature_extractor, processor.tokenizer, audio_layout=processor.audio_layout,
                             prompt=processor.prompt, use_chat_template=chat_template)


def _user(*parts, text: str | None = None) -> dict:
    content = [{"type": "audio", "audio": clip} for clip in parts]
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _assert_same(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def _labelled_text(processor, batch, row: int = 0) -> str:
    labels = batch["labels"][row]
    return processor.tokenizer.decode(labels[labels != IGNORE_INDEX])


@pytest.mark.parametrize("chat_template", [False, True])
@pytest.mark.parametrize(("encoder", "layout"), [("wav2vec2-layer", "placeholder"), ("whisper", "placeholder"),
                                                 ("wav2vec2-layer", "prefix"), ("whisper", "prefix")])
def test_single_user_turn_equals_processor_call(build, clips, encoder, layout, chat_template):
    """A model trained through processor(audio, prompt=T) must get the very same inputs from a chat asking T."""
    processor = _processor(build(encoder, "qwen2", layout=layout)[0], chat_template)
    got = processor.apply_chat_template([_user(clips[0], text="what time is it")])
    _assert_same(got, processor(clips[0], prompt="what time is it"))


@pytest.mark.parametrize("layout", ["placeholder", "prefix"])
def test_plain_rendering_of_one_exchange_equals_a_training_pair(build, clips, layout):
    """Without a chat template, [user: audio + T, assistant: A] is processor(audio, text=A, prompt=T), labels too."""
    processor, _ = build("wav2vec2-layer", "qwen2", layout=layout)
    chat = [_user(clips[1], text="transcribe"), {"role": "assistant", "content": "call mom tomorrow morning"}]
    got = processor.apply_chat_template(chat, return_labels=True)
    _assert_same(got, processor(clips[1], text="call mom tomorrow morning", prompt="transcribe"))


@pytest.mark.parametrize("chat_template", [False, True])
def test_labels_cover_only_the_assistant_turns(build, clips, chat_template):
    processor = _processor(build("wav2vec2-layer", "qwen2", layout="placeholder")[0], chat_template)
    chat = [
        {"role": "system", "content": "answer briefly"},
        _user(clips[0], text="what time"),
        {"role": "assistant", "content": "seven thirty"},
        {"role": "user", "content": [{"type": "text", "text": "and the city"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "paris"}]},
    ]
    batch = processor.apply_chat_template(chat, return_labels=True)
    end = "<|im_end|>" if chat_template else processor.tokenizer.eos_token  # the template's end of turn, or EOS
    assert _labelled_text(processor, batch) == f"seven thirty{end}paris{end}"
    labelled = batch["labels"][0] != IGNORE_INDEX
    torch.testing.assert_close(batch["input_ids"][0][labelled], batch["labels"][0][labelled])
    unlabelled = processor.tokenizer.decode(batch["input_ids"][0][~labelled])
    assert "answer briefly" in unlabelled and "what time" in unlabelled and "and the city" in unlabelled


def test_several_clips_in_one_conversation_keep_their_places(build, clips):
    processor, model = build("whisper", "qwen2", layout="placeholder")
    chat = [{"role": "user", "content": [
        {"type": "text", "text": "first"}, {"type": "audio", "audio": clips[0]},
        {"type": "text", "text": "then"}, {"type": "audio", "audio": clips[2]}, {"type": "audio", "audio": clips[1]},
    ]}]
    assert processor.apply_chat_template(chat, tokenize=False) == "first\n<|audio|>\nthen\n<|audio|><|audio|>"
    batch = processor.apply_chat_template(chat)
    _assert_same({k: batch[k] for k in ("input_features", "attention_mask")},
                 processor.extract_audio([clips[0], clips[2], clips[1]]))
    audio_token = processor.tokenizer.convert_tokens_to_ids("<|audio|>")
    assert int((batch["input_ids"] == audio_token).sum()) == 3
    assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape == (1, 2)


def test_prefix_layout_refuses_a_second_clip_and_points_at_it(build, clips):
    processor, _ = build("wav2vec2-layer", "qwen2", layout="prefix")
    chat = [_user(clips[0], text="compare"), _user(clips[1])]
    with pytest.raises(ChatError, match=r"conversation\[0\]\.messages\[1\]\.content\[0\]: 2 audio clips") as info:
        processor.apply_chat_template(chat)
    assert "placeholder" in str(info.value)


def test_prefix_layout_refuses_a_chat_without_audio(build):
    processor, _ = build("wav2vec2-layer", "qwen2", layout="prefix")
    with pytest.raises(ChatError, match=r"conversation\[0\]: 0 audio clips.*exactly one"):
        processor.apply_chat_template([{"role": "user", "content": "hello"}])


def _wav_base64(clip: np.ndarray) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, clip, 16000, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode()


def test_openai_input_audio_part_equals_the_array(build, clips):
    processor, _ = build("wav2vec2-layer", "qwen2", layout="placeholder")
    part = {"type": "input_audio", "input_audio": {"data": _wav_base64(clips[1]), "format": "wav"}}
    chat = [{"role": "user", "content": [part, {"type": "text", "text": "transcribe"}]}]
    _assert_same(processor.apply_chat_template(chat), processor(clips[1], prompt="transcribe"))


def test_path_bytes_and_resampled_array_parts(build, clips, tmp_path):
    processor, _ = build("wav2vec2-layer", "qwen2", layout="placeholder")
    sf.write(tmp_path / "a.wav", clips[0], 16000, subtype="FLOAT")
    at_8k = make_clips((0.3,), sampling_rate=8000)[0]
    chat = [{"role": "user", "content": [
        {"type": "audio", "path": str(tmp_path / "a.wav")},
        {"type": "audio", "audio": (tmp_path / "a.wav").read_bytes()},
        {"type": "audio", "audio": at_8k, "sampling_rate": 8000},
    ]}]
    batch = processor.apply_chat_template(chat)
    assert batch["attention_mask"].sum(-1).tolist() == [len(clips[0]), len(clips[0]), 4800]
    torch.testing.assert_close(batch["input_values"][0], batch["input_values"][1], rtol=0, atol=0)


def _generate(model, batch):
    return model.generate(**batch, max_new_tokens=5, do_sample=False)


@pytest.mark.parametrize("encoder", ["wav2vec2-layer", "whisper"])
@pytest.mark.parametrize("layout", ["placeholder", "prefix"])
def test_batched_chats_generate_what_each_generates_alone(build, encoder, layout):
    processor, model = build(encoder, "qwen2", layout=layout)
    processor = _processor(processor, chat_template=True)
    a, b, c, d = make_clips((0.55, 0.3, 0.8, 0.4))
    if layout == "placeholder":  # two clips in one conversation, one in another, history in a third
        chats = [
            [_user(a, b, text="which is louder")],
            [{"role": "system", "content": "be brief"}, _user(c, text="transcribe")],
            [_user(d, text="what time"), {"role": "assistant", "content": "seven"}, {"role": "user", "content": "am?"}],
        ]
    else:
        chats = [[_user(a, text="transcribe")], [{"role": "system", "content": "be brief"}, _user(c)],
                 [_user(d, text="what time"), {"role": "assistant", "content": "seven"},
                  {"role": "user", "content": "am?"}]]
    batched = _generate(model, processor.apply_chat_template(chats))
    pad = processor.tokenizer.pad_token_id
    for index, chat in enumerate(chats):
        alone = _generate(model, processor.apply_chat_template(chat))[0].tolist()
        assert batched[index].tolist()[: len(alone)] == alone, f"conversation {index}"
        assert all(t == pad for t in batched[index].tolist()[len(alone):])


def test_text_only_chats_batch_like_one_by_one(build):
    """The placeholder layout allows chats without audio: no audio keys, left padding for generate."""
    processor, model = build("wav2vec2-layer", "qwen2", layout="placeholder")
    chats = [[{"role": "user", "content": "set an alarm for seven thirty"}], [{"role": "user", "content": "play"}]]
    batch = processor.apply_chat_template(chats)
    assert set(batch) == {"input_ids", "decoder_attention_mask"} and batch["decoder_attention_mask"][1, 0] == 0
    width = batch["input_ids"].shape[1]
    batched = _generate(model, batch)[:, width:]  # text-only generate returns the prompt too (transformers' way)
    for index, chat in enumerate(chats):
        alone = processor.apply_chat_template(chat)
        assert batched[index].tolist() == _generate(model, alone)[0, alone["input_ids"].shape[1]:].tolist()


def test_tokenize_false_renders_strings(build, clips):
    processor = _processor(build("wav2vec2-layer", "qwen2", layout="placeholder")[0], chat_template=True)
    chat = [_user(clips[0], text="hi")]
    assert processor.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\n<|audio|>\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template([chat, chat], tokenize=False, add_generation_prompt=False) == [
        "<|im_start|>user\n<|audio|>\nhi<|im_end|>\n"
    ] * 2


def test_transcription_request_equals_processor_call(build, clips):
    processor, _ = build("whisper", "qwen2", layout="placeholder")
    _assert_same(processor.apply_transcription_request(clips[2]), processor(clips[2]))
    _assert_same(processor.apply_transcription_request(clips, prompt="spell it"), processor(clips, prompt="spell it"))


def test_return_dict_false_gives_input_ids(build, clips):
    processor, _ = build("wav2vec2-layer", "qwen2", layout="placeholder")
    ids = processor.apply_chat_template([_user(clips[0], text="hi")], return_dict=False)
    torch.testing.assert_close(ids, processor(clips[0], prompt="hi")["input_ids"], rtol=0, atol=0)


_CLIP = make_clips((0.3,))[0]
BAD_CHATS = [
    ([], r"conversation\[0\]: empty conversation"),
    ([[_user(_CLIP)], []], r"conversation\[1\]: empty conversation"),
    ([{"role": "tool", "content": "x"}], r"conversation\[0\]\.messages\[0\]: unknown role 'tool'"),
    ([{"content": "x"}], r"messages\[0\]: unknown role None"),
    ([_user(_CLIP), {"role": "user", "content": [{"type": "image", "image": "x"}]}],
     r"messages\[1\]\.content\[0\]: unknown content part type 'image'"),
    ([{"role": "user", "content": 3}], r"messages\[0\]: content must be a string or a list of parts"),
    ([{"role": "user", "content": ["plain string"]}], r"content\[0\]: a content part must be a dict"),
    ([{"role": "user", "content": [{"type": "text", "text": "a <|audio|> b"}]}], "audio placeholder"),
    ([{"role": "assistant", "content": [{"type": "audio", "audio": _CLIP}]}], "only allowed in user messages"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "https://example.com/a.wav"}]}], "not fetched"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "exactly one of 'audio', 'path' or 'url'"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "/no/such/file.wav"}]}],
     r"content\[0\]: bad audio: file not found"),
    ([{"role": "user", "content": [{"type": "audio", "audio": np.array([0.1, np.nan])}]}],
     r"content\[0\]: bad audio: contains 1 NaN"),
    ([{"role": "user", "content": [{"type": "audio", "audio": np.zeros(0)}]}], "bad audio: contains no audio"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]}],
     "not valid base64"),
    ([{"role": "user", "content": [{"type": "input_audio",
                                    "input_audio": {"data": base64.b64encode(b"noise").decode(), "format": "wav"}}]}],
     "bad audio: not a readable audio file"),
    ([_user(*[_CLIP] * 9)], r"conversation\[0\]: 9 audio clips, more than max_clips=8"),
]


@pytest.mark.parametrize(("chat", "message"), BAD_CHATS)
def test_bad_chats_name_the_conversation_message_and_part(build, chat, message):
    processor, _ = build("wav2vec2-layer", "qwen2", layout="placeholder")
    with pytest.raises(ChatError, match=message):
        processor.apply_chat_template(chat)


def test_labels_need_an_assistant_message(build, clips):
    processor, _ = build("wav2vec2-layer", "qwen2", layout="placeholder")
    with pytest.raises(ChatError, match="no assistant message"):
        processor.apply_chat_template([_user(clips[0], text="hi")], return_labels=True)


def test_chat_error_survives_pickling():
    """DataLoader workers send exceptions to the main process pickled."""
    error = pickle.loads(pickle.dumps(ChatError("bad audio", 1, 2, 3)))
    assert str(error) == "conversation[1].messages[2].content[3]: bad audio" and error.part == 3


@pytest.mark.parametrize("chat_template", [False, True])
def test_end_of_turn_tokens_are_what_chat_training_labels(build, clips, chat_template):
    """generate must stop on the token that training puts after each answer (the template's, not always EOS)."""
    processor = _processor(build("wav2vec2-layer", "qwen2", layout="placeholder")[0], chat_template)
    chat = [_user(clips[0], text="hi"), {"role": "assistant", "content": "play"}]
    labels = processor.apply_chat_template(chat, return_labels=True)["labels"][0]
    assert int(labels[labels != IGNORE_INDEX][-1]) in processor.end_of_turn_token_ids
    tokens = processor.tokenizer.convert_ids_to_tokens(processor.end_of_turn_token_ids)
    assert tokens == (["</s>", "<|im_end|>"] if chat_template else ["</s>"])

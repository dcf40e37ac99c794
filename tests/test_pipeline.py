"""transformers' "any-to-any" pipeline on a saved SpeechLM folder answers a chat with audio exactly as
`apply_chat_template` -> `generate` -> `batch_decode` does, one chat or several."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchFeature, pipeline

from tests.conftest import make_clips

GENERATE = {"max_new_tokens": 6, "do_sample": False}


def _chat(clip, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=["wav2vec2-layer", "whisper"])
def saved(request, build, tmp_path_factory):
    processor, model = build(request.param, "qwen2", layout="placeholder", dtype=torch.float32)
    folder = tmp_path_factory.mktemp(f"pipeline-{request.param}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, processor, model


def _expected(processor, model, chats) -> list[str]:
    return processor.batch_decode(model.generate(**processor.apply_chat_template(chats), **GENERATE))


def test_pipeline_answers_one_chat_like_generate(saved):
    folder, processor, model = saved
    pipe = pipeline("any-to-any", model=str(folder))
    chat = _chat(make_clips()[0], "transcribe")
    answer = pipe(text=chat, generate_kwargs=GENERATE, return_full_text=False)
    assert [row["generated_text"] for row in answer] == _expected(processor, model, [chat])
    full = pipe(text=chat, generate_kwargs=GENERATE)[0]["generated_text"]
    assert full[:-1] == chat and full[-1] == {"role": "assistant", "content": answer[0]["generated_text"]}


@pytest.mark.parametrize("batch_size", [1, 2])
def test_pipeline_answers_several_chats_like_batched_generate(saved, batch_size):
    folder, processor, model = saved
    if batch_size > 1 and processor.audio_input_name == "input_features":
        pytest.skip("the pipeline's collate pads dim 1 of (1, mel_bins, frames) input_features: Whisper-family "
                    "encoders batch through the pipeline with batch_size=1 only")
    pipe = pipeline("any-to-any", model=str(folder), batch_size=batch_size)
    chats = [_chat(clip, text) for clip, text in zip(make_clips((0.55, 0.3, 0.8)), ["transcribe", "what", "hi"])]
    answers = pipe(text=chats, generate_kwargs=GENERATE, return_full_text=False)
    assert [rows[0]["generated_text"] for rows in answers] == _expected(processor, model, chats)


def test_apply_chat_template_takes_what_the_pipeline_passes(saved):
    _, processor, _ = saved
    chat = _chat(make_clips()[0], "transcribe")
    batch = processor.apply_chat_template(chat, return_tensors="pt", processor_kwargs={},
                                          continue_final_message=False)
    assert isinstance(batch, BatchFeature)
    assert batch.to(dtype=torch.float16)[processor.audio_input_name].dtype == torch.float16
    with pytest.raises(ValueError, match="continue_final_message=True"):
        processor.apply_chat_template(chat, continue_final_message=True)
    with pytest.raises(ValueError, match="return_tensors='np'"):
        processor.apply_chat_template(chat, return_tensors="np")
    with pytest.raises(TypeError, match="padding"):
        processor.apply_chat_template(chat, processor_kwargs={"padding": True})

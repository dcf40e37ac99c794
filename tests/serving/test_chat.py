"""`POST /v1/chat/completions` with audio (issue 13), live on loopback, driven by the official `openai` client.

Every answer is compared with the model run alone on the same conversation (`processor.apply_chat_template` +
`generate`), so batching, streaming and the HTTP layer are shown to change nothing.
"""

from __future__ import annotations

import base64
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from speechlm import SpeechLMProcessor
from speechlm.audio import load_audio
from speechlm.inference.structured import first_quoted, with_json_schema
from speechlm.joint_ctc import json_string_span
from speechlm.serving import create_app
from tests.conftest import make_clips
from tests.inference.test_structured import ROT, SCHEMA, TIME, follows_schema
from tests.serving.conftest import slow_down
from tests.serving.test_app import live_server, settings, wav_bytes
from tests.test_joint_ctc import SPAN_SCHEMA

TOKENS = 10
ENDPOINT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def chat_model(build):
    """Placeholder layout (several clips anywhere in a chat) and the tokenizer's ChatML template."""
    processor, model = build("whisper", "qwen2", layout="placeholder")
    processor = SpeechLMProcessor(processor.feature_extractor, processor.tokenizer, audio_layout="placeholder",
                                  prompt="transcribe", use_chat_template=True)  # fmt: skip
    return processor, model


@pytest.fixture(scope="module")
def server(chat_model):
    processor, model = chat_model
    app = create_app(model, processor, settings(max_new_tokens=TOKENS, max_completion_tokens=600))
    with live_server(app) as url:
        yield url, app


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def clip(seconds: float = 0.7, seed: int = 0) -> bytes:
    return wav_bytes(make_clips((seconds,), seed=seed)[0])


def alone(chat_model, messages: list[dict], max_new_tokens: int = TOKENS, **options) -> dict:
    """The model on this conversation by itself: text, generated tokens and prompt positions (audio included), and
    every returned sequence's text (`num_return_sequences`); `options`: more `generate` options (a `json_schema`)."""
    processor, model = chat_model
    conversation = []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        for part in [] if isinstance(content, str) else content:
            if part["type"] == "text":
                parts.append(part)
            else:
                data = base64.b64decode(part["input_audio"]["data"])
                parts.append({"type": "audio", "audio": load_audio(data, 16000, name="x.wav")})
        conversation.append({"role": "system" if message["role"] == "developer" else message["role"], "content": parts})
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True)
    with torch.no_grad():
        options = with_json_schema(options | {"max_new_tokens": max_new_tokens, "do_sample": False}, model,
                                   processor.tokenizer)  # fmt: skip
        rows = model.generate(**inputs, **options)
        tokens = rows[0].tolist()
        prompt = int(model.prepare_inputs(**inputs).attention_mask.sum()) if "attention_mask" in inputs else None
    text = int(inputs["decoder_attention_mask"].sum() - (inputs["input_ids"] == model.config.audio_token_id).sum())
    eos = processor.tokenizer.eos_token_id
    count = tokens.index(eos) + 1 if eos in tokens else len(tokens)
    return {"text": processor.batch_decode([tokens])[0], "completion_tokens": count, "prompt_tokens": prompt or text,
            "audio_tokens": (prompt or text) - text, "texts": processor.batch_decode(rows)}  # fmt: skip


def ask(question: str, *clips: bytes, system: str | None = "Answer briefly.") -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": [*map(audio_part, clips), {"type": "text", "text": question}]}]


# ------------------------------------------------------------------------------------------------ happy paths
def test_chat_with_audio_equals_the_model_alone(chat_model, client):
    messages = ask("What did the speaker say?", clip(seed=1))
    expected = alone(chat_model, messages)
    assert expected["text"]
    reply = client.chat.completions.create(model="tiny-speechlm", messages=messages)
    assert reply.object == "chat.completion" and reply.model == "tiny-speechlm" and reply.id.startswith("chatcmpl-")
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == expected["text"]
    assert choice.finish_reason == ("stop" if expected["completion_tokens"] < TOKENS else "length")
    assert reply.usage.prompt_tokens == expected["prompt_tokens"]
    assert reply.usage.prompt_tokens_details.audio_tokens == expected["audio_tokens"] > 0
    assert reply.usage.completion_tokens == expected["completion_tokens"]
    assert reply.usage.total_tokens == expected["prompt_tokens"] + expected["completion_tokens"]
    # max_completion_tokens and max_tokens both set the budget.
    short = alone(chat_model, messages, max_new_tokens=3)
    for key in ("max_tokens", "max_completion_tokens"):
        reply = client.chat.completions.create(model="m", messages=messages, **{key: 3})
        assert reply.choices[0].message.content == short["text"] and reply.usage.completion_tokens <= 3


def test_streaming_chat_equals_non_streaming(chat_model, client, server):
    messages = ask("Repeat it.", clip(seed=2))
    expected = alone(chat_model, messages)
    chunks = list(client.chat.completions.create(model="m", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) > 1  # token by token
    assert "".join(c.choices[0].delta.content for c in text_chunks) == expected["text"]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop" if expected["completion_tokens"] < TOKENS else "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected["completion_tokens"]
    assert chunks[-1].usage.prompt_tokens == expected["prompt_tokens"]
    # On the wire: server-sent events ending with OpenAI's sentinel.
    raw = httpx.post(server[0] + ENDPOINT, json={"model": "m", "messages": messages, "stream": True}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n") and '"usage"' not in raw.text


def test_multi_turn_with_two_clips_and_a_system_message(chat_model, client):
    messages = [
        {"role": "developer", "content": "You listen carefully."},
        {"role": "user", "content": [audio_part(clip(0.6, seed=3)), {"type": "text", "text": "What was said?"}]},
        {"role": "assistant", "content": "call mom tomorrow morning"},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, audio_part(clip(0.9, seed=4))]},
    ]
    expected = alone(chat_model, messages)
    reply = client.chat.completions.create(model="m", messages=messages)
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.prompt_tokens == expected["prompt_tokens"]
    # Text only is a conversation too (the placeholder layout takes any number of clips, none included).
    text_only = [{"role": "user", "content": "turn off the kitchen lights"}]
    reply = client.chat.completions.create(model="m", messages=text_only)
    assert reply.choices[0].message.content == alone(chat_model, text_only)["text"]


def test_batched_chat_equals_one_by_one(chat_model, server, client):
    _, app = server
    conversations = [ask(f"Question {i}?", clip(0.4 + 0.07 * i, seed=20 + i)) for i in range(8)]
    expected = [alone(chat_model, messages)["text"] for messages in conversations]
    before = app.state.batcher.stats()

    def send(messages):
        return client.chat.completions.create(model="m", messages=messages).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, conversations))
    after = app.state.batcher.stats()
    assert answers == expected
    assert after["clips"] - before["clips"] == 8
    assert after["batches"] - before["batches"] < 8 and after["largest_batch"] > 1  # really decoded together


def test_stop_strings_and_seeds(chat_model, client):
    messages = ask("Say something.", clip(seed=5))
    text = alone(chat_model, messages, max_new_tokens=40)["text"]
    stop = text[3:5]
    cut = text[: text.find(stop)]
    for stream in (False, True):
        kwargs = dict(model="m", messages=messages, max_tokens=40, stop=[stop, "zzzz"])
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            reply = client.chat.completions.create(**kwargs)
            got, reason = reply.choices[0].message.content, [reply.choices[0].finish_reason]
            assert reply.usage.completion_tokens < 40  # the padding after the stop is not counted
        assert got == cut.strip() and reason == ["stop"]
    sampled = [client.chat.completions.create(model="m", messages=messages, temperature=1.0, top_p=0.9, seed=7,
                                              max_tokens=12).choices[0].message.content for _ in range(2)]  # fmt: skip
    assert sampled[0] == sampled[1]


def test_response_format_json_schema_holds_the_answer_to_the_schema(client):
    """OpenAI's structured outputs, streamed or not; the tiny untrained model would not write JSON by itself."""
    kwargs = dict(model="m", messages=ask("The intent as JSON.", clip(seed=6)), max_tokens=40,
                  response_format={"type": "json_schema", "json_schema": {"name": "frame", "schema": SCHEMA}})
    reply = client.chat.completions.create(**kwargs)
    assert follows_schema(reply.choices[0].message.content) and reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content


@pytest.fixture(scope="module")
def joint_served(build):
    """A chat model with a CTC head, served with joint CTC decoding at 0.5, and a client for it."""
    processor, model = build("whisper", "qwen2", layout="placeholder")
    processor = SpeechLMProcessor(processor.feature_extractor, processor.tokenizer, audio_layout="placeholder",
                                  prompt="transcribe", use_chat_template=True)  # fmt: skip
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    with live_server(create_app(model, processor, settings(max_new_tokens=40, joint_ctc_weight=0.5))) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            yield (processor, model), client


def held_to(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "frame", "schema": schema}}


def test_a_chat_answer_opening_with_a_transcript_decodes_that_field_jointly_with_the_ctc_head(joint_served):
    (processor, model), client = joint_served
    messages = ask("What was said, and what is the intent?", clip(seed=3))
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=40,
                                           response_format=held_to(SPAN_SCHEMA))  # fmt: skip
    joint = alone((processor, model), messages, 40, json_schema=SPAN_SCHEMA, joint_ctc_weight=0.5,
                  joint_ctc_span=json_string_span(processor.tokenizer))  # fmt: skip
    assert reply.choices[0].message.content == joint["text"] != alone((processor, model), messages, 40,
                                                                      json_schema=SPAN_SCHEMA)["text"]


def test_chat_answers_the_head_cannot_transcribe_are_the_llms_alone(joint_served):
    """A schema that does not open with a transcript, or two clips (which one would the field transcribe?)."""
    chat_model, client = joint_served
    for messages, schema in ((ask("The intent?", clip(seed=3)), SCHEMA),
                             (ask("What was said?", clip(seed=3), clip(seed=4)), SPAN_SCHEMA)):
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=40,
                                               response_format=held_to(schema))  # fmt: skip
        assert reply.choices[0].message.content == alone(chat_model, messages, 40, json_schema=schema)["text"]


# Words the untrained chat model writes both ways: its best beam transcribes "red", not a colour here (the colour
# comes from the list), its third beam "blue" (quoted).
PICKY = {**ROT, "properties": {
    "transcript": {"type": "string", "pattern": "^(?:reef|red|blue)(?: (?:reef|red|blue)){0,2}$"},
    "colour": {"type": "string", "pattern": "^(?:rot|blue|pink)$"}}}


@pytest.fixture(scope="module")
def beams_client(chat_model):
    """A client of the chat model served with 4 beams, chat answers that quote a transcript preferring quoted beams."""
    processor, model = chat_model
    app = create_app(model, processor, settings(max_new_tokens=64, num_beams=4, prefer_quoted=True))
    with live_server(app) as url, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        yield client


def test_chat_decodes_with_the_servers_beam_width(chat_model, beams_client):
    messages = ask("What did the speaker say?", clip(seed=1))
    reply = beams_client.chat.completions.create(model="m", messages=messages, max_tokens=TOKENS)
    assert reply.choices[0].message.content == alone(chat_model, messages, num_beams=4)["text"]


def test_prefer_quoted_answers_a_quoting_chat_with_its_best_quoted_beam(chat_model, beams_client):
    messages = ask("The colour?", clip(seed=0), system=None)
    reply = beams_client.chat.completions.create(model="m", messages=messages, max_tokens=64,
                                                 response_format=held_to(PICKY))  # fmt: skip
    beams = alone(chat_model, messages, 64, json_schema=PICKY, num_beams=4, num_return_sequences=4)["texts"]
    assert reply.choices[0].message.content == first_quoted(PICKY, beams) != beams[0]


def test_prefer_quoted_without_beams_is_refused_when_the_server_is_built(chat_model):
    processor, model = chat_model
    with pytest.raises(ValueError, match="prefer_quoted chooses among beams: give num_beams >= 2"):
        create_app(model, processor, settings(prefer_quoted=True))


def test_vllm_structured_outputs_regex_holds_the_answer(client):
    """vLLM's `structured_outputs` extra: OpenAI's `response_format` has no regex, and a short answer (a time, a
    number) is a regex, not a JSON object."""
    reply = client.chat.completions.create(model="m", messages=ask("What time?", clip(seed=6)), max_tokens=20,
                                           extra_body={"structured_outputs": {"regex": TIME}})
    assert re.fullmatch(TIME, reply.choices[0].message.content), reply.choices[0].message.content


def test_vllm_structured_outputs_choice_answers_one_of_the_choices_verbatim(client):
    choices = ["3.5 (approx)", "a|b", "none of these?"]  # regex characters are taken literally
    reply = client.chat.completions.create(model="m", messages=ask("Which?", clip(seed=6)), max_tokens=20,
                                           extra_body={"structured_outputs": {"choice": choices}})
    assert reply.choices[0].message.content in choices


# ------------------------------------------------------------------------------------------------ errors
def test_bad_chat_requests_are_400_naming_the_part(client, server):
    wav = clip()
    cases = [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0]", "images are not supported"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                    {"type": "input_audio", "input_audio": {"data": "@@@"}}]}]},
         "messages[0].content[1]", "not valid base64"),
        ({"messages": ask("?", b"I am not audio")}, "messages[1].content[0]", "not a readable audio file"),
        ({"messages": ask("?", wav_bytes(make_clips((0.01,))[0]))}, "messages[1].content[0]", "shorter than"),
        ({"messages": ask("?", clip(5.0))}, "messages[1].content[0]", "longer than"),
        ({"messages": ask("?", *[wav] * 9)}, "messages", "9 audio clips, more than the limit of 8"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "role 'tool' is not supported"),
        ({"messages": [{"role": "assistant", "content": [audio_part(wav)]}]}, "messages[0].content[0]",
         "audio is only allowed in user messages"),
        ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "https://x/a.wav"}}]}]},
         "messages[0].content[0]", "not fetched"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": ask("?", wav), "n": 2}, "n", "n must be 1"),
        ({"messages": ask("?", wav), "logprobs": True}, "logprobs", "not supported"),
        ({"messages": ask("?", wav), "tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"messages": ask("?", wav), "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
        ({"messages": ask("?", wav), "store": True}, "store", "not supported"),
        ({"messages": ask("?", wav), "best_of": 3}, "best_of", "not supported"),
        ({"messages": ask("?", wav), "max_tokens": 0}, "max_tokens", "between 1 and 600"),
        ({"messages": ask("?", wav), "temperature": 2.5}, "temperature", "between 0 and 2"),
        ({"messages": ask("?", wav), "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
        ({"messages": ask("?", wav), "stream_options": {"include_usage": True}}, "stream_options", "stream=true"),
        ({"messages": ask("?", wav), "max_tokens": 600}, "messages", "512 positions"),
        ({"messages": ask("x" * 20000, wav)}, "messages", "characters of text, more than the limit"),
        ({"messages": ask("?", wav), "response_format": {"type": "yaml"}}, "response_format", "must be"),
        ({"messages": ask("?", wav), "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema", "must be a JSON schema object"),
        ({"messages": ask("?", wav), "response_format": {"type": "json_schema",
                                                          "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
         "response_format.json_schema.schema", "objekt"),
        ({"messages": ask("?", wav), "structured_outputs": {"regex": "(x"}}, "structured_outputs.regex",
         "is not usable"),
        ({"messages": ask("?", wav), "structured_outputs": {"choice": []}}, "structured_outputs.choice",
         "non-empty list"),
        ({"messages": ask("?", wav), "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
         "exactly one of"),
        ({"messages": ask("?", wav), "structured_outputs": {"grammar": "root ::= 'a'"}}, "structured_outputs",
         "exactly one of"),
        ({"messages": ask("?", wav), "structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
         "structured_outputs", "not both"),
    ]  # fmt: skip
    for body, param, message in cases:
        response = httpx.post(server[0] + ENDPOINT, json={"model": "m"} | body, timeout=60)
        assert response.status_code == 400, (param, response.text)
        error = response.json()["error"]
        assert error["param"] == param and message in error["message"], (param, error)
        assert error["type"] == "invalid_request_error"
    for junk in (b"{not json", b"[" * 100_000 + b"]" * 100_000):
        response = httpx.post(server[0] + ENDPOINT, content=junk, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="not a readable audio file"):
        client.chat.completions.create(model="m", messages=ask("?", b"RIFF...."))
    with pytest.raises(openai.BadRequestError, match="images are not supported"):  # streaming: still a plain 400
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
        list(client.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": [image]}]))
    assert client.chat.completions.create(model="m", messages=ask("?", wav)).choices[0].message.content is not None


def test_chat_token_limit_and_guard_limits(chat_model):
    processor, model = chat_model
    app = create_app(model, processor, settings(max_chat_tokens=30, api_key="k", max_upload_bytes=200_000))
    with live_server(app) as url:
        body = {"model": "m", "messages": ask("one two three " * 10, clip())}
        assert httpx.post(url + ENDPOINT, json=body, timeout=30).status_code == 401
        response = httpx.post(url + ENDPOINT, json=body, headers={"Authorization": "Bearer k"}, timeout=30)
        assert response.status_code == 400 and "more than the limit of 30" in response.json()["error"]["message"]
        big = {"model": "m", "messages": ask("?", clip(4.0))}  # 4 s of float32 WAV = 256 kB, base64 = 341 kB
        response = httpx.post(url + ENDPOINT, json=big, headers={"Authorization": "Bearer k"}, timeout=30)
        assert response.status_code == 413
        response = httpx.post(url + ENDPOINT, json=body, timeout=30,
                              headers={"Authorization": "Bearer k", "Origin": "https://evil.example"})  # fmt: skip
        assert response.status_code == 403


@pytest.fixture
def slow_generate(chat_model, monkeypatch):
    """Every chat generation takes 400 forced steps of 50 ms unless the server stops it."""
    return slow_down(monkeypatch, chat_model[1], "generate", min_new_tokens=400, max_new_tokens=400)


def test_chat_timeout_and_disconnect_stop_the_decoding(chat_model, slow_generate):
    processor, model = chat_model
    with live_server(create_app(model, processor, settings(request_timeout=0.5))) as url:
        body = {"model": "m", "messages": ask("?", clip())}
        response = httpx.post(url + ENDPOINT, json=body, timeout=30)
        assert response.status_code == 504 and response.json()["error"]["code"] == "request_timeout"
        assert slow_generate["ended"].wait(10) and slow_generate["criteria"][0].steps < 400
    slow_generate["ended"].clear()
    with live_server(create_app(model, processor, settings(request_timeout=60))) as url:
        with httpx.stream("POST", url + ENDPOINT, json=body | {"stream": True}, timeout=30) as response:
            assert response.status_code == 200
            assert next(response.iter_lines()).startswith('data: {"id": "chatcmpl-')
        assert slow_generate["ended"].wait(10), "decoding went on after the client went away"
        assert slow_generate["criteria"][1].steps < 400
        assert httpx.get(url + "/health", timeout=10).json()["batching"]["pending"] == 0


def test_chats_and_transcriptions_share_the_worker(chat_model, server, client):
    """Both kinds wait in one queue and each gets what it gets alone (a batch holds one kind)."""
    from speechlm.inference import transcribe_arrays

    processor, model = chat_model
    wavs = [clip(0.5 + 0.1 * i, seed=40 + i) for i in range(4)]
    chats = [ask("What was said?", wav) for wav in wavs]
    expected_chat = [alone(chat_model, messages)["text"] for messages in chats]
    expected_text = [transcribe_arrays(model, processor, [load_audio(wav, 16000)], max_new_tokens=TOKENS)[0]
                     for wav in wavs]  # fmt: skip

    def chat(index):
        return client.chat.completions.create(model="m", messages=chats[index]).choices[0].message.content

    def transcribe(index):
        return client.audio.transcriptions.create(model="m", file=(f"{index}.wav", wavs[index])).text

    with ThreadPoolExecutor(8) as pool:
        chat_answers = [pool.submit(chat, i) for i in range(4)]
        transcripts = [pool.submit(transcribe, i) for i in range(4)]
        assert [f.result() for f in chat_answers] == expected_chat
        assert [f.result() for f in transcripts] == expected_text


def test_streaming_chat_timeout_after_the_first_chunk_is_an_error_event(chat_model, slow_generate):
    processor, model = chat_model
    with live_server(create_app(model, processor, settings(request_timeout=1.0))) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            chunks = []
            with pytest.raises(openai.APIError, match="request timeout") as error:
                for chunk in client.chat.completions.create(model="m", messages=ask("?", clip()), stream=True):
                    chunks.append(chunk)
            assert error.value.code == "request_timeout"
            assert chunks and chunks[0].choices[0].delta.role == "assistant"
        assert slow_generate["ended"].wait(10) and slow_generate["criteria"][0].steps < 400

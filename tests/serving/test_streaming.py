"""Transcriptions with `stream=true` and OpenAI's other transcription parameters (issue 13): every parameter is
honoured or refused with a 400, never silently ignored. Live server on loopback, the official `openai` client."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

from speechlm.serving import create_app
from tests.conftest import make_clips
from tests.serving.conftest import stopped_early
from tests.serving.test_app import live_server, settings, wav_bytes

ENDPOINT = "/v1/audio/transcriptions"


@pytest.fixture(scope="module")
def tiny(build):
    return build("whisper", "qwen2")


@pytest.fixture(scope="module")
def server(tiny):
    processor, model = tiny
    with live_server(create_app(model, processor, settings(max_new_tokens=12))) as url:
        yield url


def reference(tiny, data: bytes, prompt: str | None = None) -> str:
    processor, model = tiny
    from speechlm.audio import load_audio
    from speechlm.inference import transcribe_arrays

    return transcribe_arrays(model, processor, [load_audio(data, 16000)], prompt, max_new_tokens=12)[0]


def test_stream_deltas_add_up_to_the_transcript(tiny, client):
    data = wav_bytes(make_clips((0.8,), seed=11)[0])
    text = reference(tiny, data)
    assert text
    for fmt in ("json", "text"):
        events = list(client.audio.transcriptions.create(model="m", file=("a.wav", data), stream=True,
                                                         response_format=fmt))  # fmt: skip
        assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
        assert events[-1].type == "transcript.text.done" and events[-1].text == text
        assert len(events) > 2  # token by token, not one delta at the end
        assert "".join(e.delta for e in events[:-1]) == text
    # Not streaming gives the same text.
    assert client.audio.transcriptions.create(model="m", file=("a.wav", data)).text == text


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (speech TTS)")
def test_long_upload_streams_chunk_by_chunk(client, tmp_path):
    from tests.inference.conftest import espeak_recording

    path, intervals = espeak_recording(tmp_path, seconds=12.0)
    verbose = client.audio.transcriptions.create(model="m", file=path, response_format="verbose_json")
    events = list(client.audio.transcriptions.create(model="m", file=path, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) == len([s for s in verbose.segments if s.text]) == len(intervals)
    assert "".join(deltas) == events[-1].text == verbose.text


def test_stream_errors_before_the_first_event_are_ordinary_4xx(client, server):
    with pytest.raises(openai.BadRequestError, match="notes.txt") as error:
        list(client.audio.transcriptions.create(model="m", file=("notes.txt", b"not audio"), stream=True))
    assert error.value.code == "invalid_audio"
    response = httpx.post(server + ENDPOINT, files={"file": ("a.wav", wav_bytes(make_clips()[0]))},
                          data={"stream": "true", "response_format": "srt"}, timeout=30)  # fmt: skip
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream"


def test_timeout_after_the_stream_began_is_an_error_event(tiny, slow_decoding):
    processor, model = tiny
    app = create_app(model, processor, settings(max_new_tokens=400, request_timeout=1.0))
    with live_server(app) as url, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        stream = client.audio.transcriptions.create(model="m", file=("a.wav", wav_bytes(make_clips()[0])),
                                                    stream=True)  # fmt: skip
        deltas = []
        with pytest.raises(openai.APIError, match="request timeout") as error:
            for event in stream:
                deltas.append(event)
        assert error.value.code == "request_timeout"
        assert deltas and all(e.type == "transcript.text.delta" for e in deltas)
        assert stopped_early(slow_decoding), "decoding went on after the timeout"


def test_client_leaving_a_stream_stops_the_decoding(tiny, slow_decoding):
    processor, model = tiny
    app = create_app(model, processor, settings(max_new_tokens=400, request_timeout=60))
    with live_server(app) as url:
        files = {"file": ("a.wav", wav_bytes(make_clips()[0]))}
        with httpx.stream("POST", url + ENDPOINT, files=files, data={"stream": "true"}, timeout=30) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            first = next(response.iter_lines())
            assert first.startswith('data: {"type": "transcript.text.delta"')
        assert stopped_early(slow_decoding), "decoding went on after the client went away"
        assert httpx.get(url + "/health", timeout=10).json()["batching"]["pending"] == 0


def test_parameters_that_cannot_be_honoured_are_400(client, server):
    data = wav_bytes(make_clips((0.5,))[0])

    def refused(**kwargs) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as error:
            client.audio.transcriptions.create(model="m", file=("a.wav", data), **kwargs)
        return error.value

    word = refused(response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert word.code == "unsupported_parameter" and "'word' is not supported" in word.message
    assert refused(timestamp_granularities=["segment"]).param == "timestamp_granularities"  # needs verbose_json
    assert refused(include=["logprobs"]).param.startswith("include")
    assert refused(chunking_strategy={"type": "server_vad"}).param.startswith("chunking_strategy")
    assert refused(extra_body={"known_speaker_names": ["a"]}).code == "unsupported_parameter"
    assert refused(language="english please").param == "language"
    assert refused(temperature=3).param == "temperature"
    assert refused(prompt="see <|audio|>").param == "prompt"
    # What is supported works: segment timestamps and the automatic chunking this server always does.
    verbose = client.audio.transcriptions.create(
        model="m", file=("a.wav", data), response_format="verbose_json", timestamp_granularities=["segment"],
        chunking_strategy="auto",
    )  # fmt: skip
    assert len(verbose.segments) == 1
    response = httpx.post(server + ENDPOINT, files={"file": ("a.wav", data)},
                          data={"timestamp_granularities[]": "word", "response_format": "verbose_json"})  # fmt: skip
    assert response.status_code == 400 and "word" in response.json()["error"]["message"]


def test_prompt_is_context_and_instructions_replace_the_instruction(tiny, client):
    """OpenAI's `prompt` is context after the model's own instruction; `instructions` (our extension) replaces it."""
    data = wav_bytes(make_clips((0.7,), seed=4)[0])

    def text(**kwargs) -> str:
        return client.audio.transcriptions.create(model="m", file=("a.wav", data), **kwargs).text

    assert text(prompt="Anna met Bob.") == reference(tiny, data, "transcribe\nContext: Anna met Bob.")
    assert text(extra_body={"instructions": "say it"}) == reference(tiny, data, "say it")
    both = text(prompt="Anna met Bob.", extra_body={"instructions": "say it"}, language="en")
    assert both == reference(tiny, data, "say it\nLanguage: en\nContext: Anna met Bob.")
    assert text() == reference(tiny, data)


def test_prompt_and_instructions_limits(tiny):
    processor, model = tiny
    with live_server(create_app(model, processor, settings(max_prompt_chars=100, max_prompt_tokens=40))) as url:
        for field in ("prompt", "instructions"):
            response = httpx.post(url + ENDPOINT, files={"file": ("a.wav", wav_bytes(make_clips()[0]))},
                                  data={field: "x" * 101}, timeout=30)  # fmt: skip
            assert response.status_code == 400, response.text
            assert response.json()["error"] == {
                "message": f"{field} has 101 characters, more than the limit of 100", "type": "invalid_request_error",
                "param": field, "code": "prompt_too_long",
            }  # fmt: skip
            response = httpx.post(url + ENDPOINT, files={"file": ("a.wav", wav_bytes(make_clips()[0]))},
                                  data={field: "x " * 45}, timeout=30)  # fmt: skip
            assert response.status_code == 400 and "tokens, more than the limit of 40" in response.text


def test_text_deltas_hold_back_what_can_still_change():
    """Deltas add up to the final text: stop strings, partial UTF-8 characters and trailing spaces are held back."""
    from speechlm.serving.streaming import TextDeltas
    from tests.tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    text = " set an alarm for seven thirty é!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for stops, final in (
        ((), text.strip()),
        (("seven",), "set an alarm for"),
        (("for s", "zz"), "set an alarm"),
    ):
        sent: list[str] = []
        deltas = TextDeltas(tokenizer, sent.append, stops)
        for token in ids:
            deltas.add(token)
            assert "\ufffd" not in "".join(sent) and not "".join(sent).endswith(" ")
            assert not any(stop in "".join(sent) for stop in stops)
        deltas.finish(final)
        assert "".join(sent) == final and len(sent) > 1

"""The OpenAI-compatible server, live on 127.0.0.1 with a tiny model, driven by the official `openai` client."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import uvicorn

import speechlm.serving.batcher as batcher_module
from speechlm.audio import load_audio
from speechlm.inference import transcribe_arrays
from speechlm.serving import ServerSettings, create_app
from speechlm.serving.app import add_serve_arguments, exposure_warning, settings_from_args, uvicorn_config
from tests.conftest import make_clips

SR = 16000
TOKENS = 6
ENDPOINT = "/v1/audio/transcriptions"


@contextlib.contextmanager
def live_server(app):
    """Run `app` with uvicorn in a thread on a free loopback port; yields the base URL, stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def tiny(build):
    return build("whisper", "qwen2")


def settings(**overrides) -> ServerSettings:
    values = dict(model_name="tiny-speechlm", max_new_tokens=TOKENS, batch_wait_ms=50.0, max_upload_bytes=2_000_000,
                  max_audio_seconds=60.0, max_chunk_seconds=4.0)  # fmt: skip
    return ServerSettings(**(values | overrides))


@pytest.fixture(scope="module")
def server(tiny):
    processor, model = tiny
    app = create_app(model, processor, settings())
    with live_server(app) as url:
        yield url, app


def wav_bytes(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, SR, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def post(url, name="a.wav", data=None, timeout=30, **form):
    data = wav_bytes(make_clips((0.5,))[0]) if data is None else data
    return httpx.post(url + ENDPOINT, files={"file": (name, data)}, data=form, timeout=timeout)


def expected_texts(tiny, wavs: list[bytes], prompt: str | None = None) -> list[str]:
    """What the model says for each upload decoded alone, the reference for every server answer."""
    processor, model = tiny
    return [transcribe_arrays(model, processor, [load_audio(data, SR)], prompt, max_new_tokens=TOKENS)[0]
            for data in wavs]  # fmt: skip


# ------------------------------------------------------------------------------------------------ happy paths
def test_an_int8_model_serves_what_it_decodes_alone(tiny):
    # `speechlm serve --quantize int8`: the server's batches go through the int8 layers like the offline path.
    import copy

    from speechlm.loading import quantize_language_model

    processor, model = tiny
    int8 = quantize_language_model(copy.deepcopy(model))
    wavs = [wav_bytes(clip) for clip in make_clips((0.5, 0.9))]
    with live_server(create_app(int8, processor, settings())) as url:
        texts = [post(url, data=data).json()["text"] for data in wavs]
    assert texts == expected_texts((processor, int8), wavs)


def served_and_joint(processor, model, server_settings) -> tuple[list[str], list[str], list[str]]:
    """Two clips' transcriptions from a live server, beside the same clips decoded jointly at weight 0.5 and by the
    LLM alone."""
    wavs = [wav_bytes(clip) for clip in make_clips((0.5, 0.9))]
    with live_server(create_app(model, processor, server_settings)) as url:
        texts = [post(url, data=data).json()["text"] for data in wavs]
    clips = [load_audio(data, SR) for data in wavs]
    joint = [transcribe_arrays(model, processor, [clip], max_new_tokens=TOKENS, joint_ctc_weight=0.5)[0]
             for clip in clips]
    return texts, joint, [transcribe_arrays(model, processor, [clip], max_new_tokens=TOKENS)[0] for clip in clips]


def test_transcriptions_decode_jointly_with_the_ctc_head_when_the_server_says_so(build):
    processor, model = build("whisper", "qwen2")
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    texts, joint, alone = served_and_joint(processor, model, settings(joint_ctc_weight=0.5))
    assert texts == joint != alone


def test_a_model_that_saved_a_joint_ctc_weight_is_served_with_it_unless_told_otherwise(build):
    processor, model = build("whisper", "qwen2")
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    model.config.ctc_head["joint_weight"] = 0.5
    texts, joint, alone = served_and_joint(processor, model, settings())
    assert texts == joint != alone


def test_joint_ctc_decoding_without_a_ctc_head_is_refused_at_start(tiny):
    processor, model = tiny
    with pytest.raises(ValueError, match="joint_ctc_weight needs a model with a CTC head"):
        create_app(model, processor, settings(joint_ctc_weight=0.5))


def test_health_and_models(server, client):
    url, _ = server
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-speechlm" and health["auth_required"] is False
    assert [model.id for model in client.models.list().data] == ["tiny-speechlm"]
    assert client.models.retrieve("tiny-speechlm").id == "tiny-speechlm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("whisper-1")


def test_every_response_format(tiny, client):
    audio = make_clips((0.8,))[0]
    data = wav_bytes(audio)
    (text,) = expected_texts(tiny, [data])
    assert text

    def create(fmt, **kwargs):
        return client.audio.transcriptions.create(
            model="whisper-1", file=("clip.wav", data), response_format=fmt, **kwargs
        )

    assert create("json").text == text
    assert create("text") == text + "\n"
    assert create("srt") == f"1\n00:00:00,000 --> 00:00:00,800\n{text}\n\n"
    assert create("vtt") == f"WEBVTT\n\n00:00:00.000 --> 00:00:00.800\n{text}\n\n"
    verbose = create("verbose_json", temperature=0.0, timestamp_granularities=["segment"])
    assert verbose.text == text and verbose.language == "unknown" and verbose.duration == pytest.approx(0.8)
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(0.0, 0.8, text)]
    # `language` is context the model reads, after its instruction (the test processor's prompt is "transcribe").
    (told,) = expected_texts(tiny, [data], "transcribe\nLanguage: en")
    verbose = create("verbose_json", language="en")
    assert verbose.text == told and verbose.language == "en"
    assert verbose.segments[0].tokens and verbose.segments[0].id == 0
    # Sampling is accepted too (its text is random, so only the shape is checked).
    assert isinstance(create("json", temperature=0.7).text, str)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (speech TTS)")
def test_long_upload_is_split_on_silence(tiny, client, tmp_path):
    from tests.inference.conftest import espeak_recording

    path, intervals = espeak_recording(tmp_path, seconds=12.0)
    verbose = client.audio.transcriptions.create(model="tiny-speechlm", file=path, response_format="verbose_json")
    assert verbose.duration > 12.0
    assert len(verbose.segments) == len(intervals)  # max_chunk_seconds=4: each sentence is its own chunk
    for segment, (start, end) in zip(verbose.segments, intervals):
        assert segment.end - segment.start <= 4.0
        assert segment.start <= start + 0.05 and segment.end >= end - 0.25


def test_concurrent_requests_equal_one_by_one(tiny, server, client):
    _, app = server
    clips = make_clips(tuple(0.3 + 0.05 * i for i in range(16)), seed=3)
    wavs = [wav_bytes(clip) for clip in clips]
    expected = expected_texts(tiny, wavs)
    before = app.state.batcher.stats()

    def send(index):
        return client.audio.transcriptions.create(model="tiny-speechlm", file=(f"{index}.wav", wavs[index])).text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, range(16)))
    after = app.state.batcher.stats()
    assert answers == expected
    assert after["clips"] - before["clips"] == 16
    assert after["batches"] - before["batches"] < 16  # requests really were decoded together
    assert after["largest_batch"] > 1


# ------------------------------------------------------------------------------------------------ errors
def test_api_key(tiny, monkeypatch):
    processor, model = tiny
    data = wav_bytes(make_clips((0.5,))[0])
    with live_server(create_app(model, processor, settings(api_key="s3cret"))) as url:
        missing = httpx.post(url + "/v1/audio/transcriptions", files={"file": ("a.wav", data)})
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "missing_api_key"
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as error:
                wrong.audio.transcriptions.create(model="m", file=("a.wav", data))
            assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
        with openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0) as right:
            assert isinstance(right.audio.transcriptions.create(model="m", file=("a.wav", data)).text, str)
        assert httpx.get(url + "/health").status_code == 200  # health and the page stay open
        assert httpx.get(url + "/").status_code == 200

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    monkeypatch.setenv("SPEECHLM_API_KEY", "from-env")
    parsed = settings_from_args(parser.parse_args(["--model", "/models/my-model", "--max-upload-mb", "1"]))
    assert parsed.api_key == "from-env" and parsed.model_name == "my-model" and parsed.max_upload_bytes == 2**20


def test_bad_uploads_are_4xx_and_the_server_keeps_serving(server, client):
    url, _ = server
    endpoint = url + "/v1/audio/transcriptions"

    def post(name, data, **form):
        return httpx.post(endpoint, files={"file": (name, data)}, data=form, timeout=60)

    cases = {
        "notes.txt": b"hello, I am not audio",
        "empty.wav": b"",
        "cut.wav": wav_bytes(make_clips()[0])[:3000],
        "click.wav": wav_bytes(np.full(5, 0.1, dtype=np.float32)),  # too short for any encoder
    }
    for name, data in cases.items():
        response = post(name, data)
        assert response.status_code == 400, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_audio" and error["type"] == "invalid_request_error"
        assert name in error["message"]

    too_long = io.BytesIO()
    sf.write(too_long, np.zeros(61 * 4000, dtype=np.int16), 4000, format="WAV", subtype="PCM_16")  # 61 s, small
    response = post("long.wav", too_long.getvalue())
    assert response.status_code == 400 and response.json()["error"]["code"] == "audio_too_long"

    response = post("huge.wav", b"\0" * 3_000_000)
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"

    response = post("a.wav", wav_bytes(make_clips((0.5,))[0]), response_format="mp3")
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"

    response = httpx.post(endpoint, data={"model": "m"})
    assert response.status_code == 400 and "file" in response.json()["error"]["message"]

    with pytest.raises(openai.BadRequestError, match="notes.txt"):
        client.audio.transcriptions.create(model="m", file=("notes.txt", b"plain text"))
    assert isinstance(client.audio.transcriptions.create(model="m", file=("ok.wav", wav_bytes(make_clips()[0]))).text,
                      str)  # fmt: skip
    assert httpx.get(url + "/v1/nope").status_code == 404


@pytest.fixture(scope="module")
def gpt2(build):
    return build("whisper", "gpt2")  # GPT-2's learned position table (512) crashed with an IndexError past its end


def test_prompt_and_position_limits_are_400(gpt2):
    processor, model = gpt2
    app = create_app(model, processor, settings(max_prompt_tokens=2000, max_prompt_chars=1200))
    with live_server(app) as url:
        response = post(url, prompt="x" * 60_000)
        assert response.status_code == 400 and response.json()["error"]["code"] == "prompt_too_long"
        response = post(url, prompt="x " * 520)  # 1,040 characters: fits the limits, not GPT-2's 512 positions
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and "512 positions" in error["message"]
        assert post(url, prompt="x " * 100).status_code == 200
    with live_server(create_app(model, processor, settings(max_new_tokens=500))) as url:
        response = post(url)
        assert response.status_code == 400 and "max_new_tokens (500)" in response.json()["error"]["message"]


def test_prompt_token_limit(tiny):
    processor, model = tiny
    with live_server(create_app(model, processor, settings(max_prompt_tokens=50))) as url:
        response = post(url, prompt="x " * 200)
        assert response.status_code == 400
        assert "tokens, more than the limit of 50" in response.json()["error"]["message"]


def test_request_timeout_is_504(tiny, monkeypatch):
    processor, model = tiny
    real = batcher_module.transcribe_arrays

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(batcher_module, "transcribe_arrays", slow)
    with live_server(create_app(model, processor, settings(request_timeout=0.2))) as url:
        response = httpx.post(url + "/v1/audio/transcriptions",
                              files={"file": ("slow.wav", wav_bytes(make_clips()[0]))}, timeout=30)  # fmt: skip
        assert response.status_code == 504
        assert response.json()["error"] == {
            "message": "Transcribing slow.wav took longer than the 0.2 s request timeout.",
            "type": "timeout", "param": None, "code": "request_timeout",
        }  # fmt: skip
        assert httpx.get(url + "/health").json()["status"] == "ok"


def test_listening_beyond_loopback_without_an_api_key_warns():
    assert exposure_warning("0.0.0.0", None).startswith("WARNING: listening on 0.0.0.0 without an API key")
    assert exposure_warning("0.0.0.0", "key") is None and exposure_warning("127.0.0.1", None) is None


# ------------------------------------------------------------------------------------------------ web page
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def web_page(url: str):
    """The server's page in headless Chromium (fake microphone allowed)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
             "--use-fake-device-for-media-stream"]  # fmt: skip
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            assert page.title() == "SpeechLM transcription"
            yield page
        finally:
            browser.close()


def wait_for_status(page, start: str) -> str:
    page.wait_for_function(f"document.getElementById('status').textContent.startsWith({start!r})", timeout=30000)
    return page.text_content("#status")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_web_page_upload_and_record(tiny, server, tmp_path):
    from tests.serving.test_chat import alone, ask

    url, _ = server
    audio = make_clips((0.7,), seed=5)[0]
    path = tmp_path / "page.wav"
    path.write_bytes(wav_bytes(audio))
    (text,) = expected_texts(tiny, [path.read_bytes()])
    with web_page(url) as page:
        page.set_input_files("#file", str(path))
        wait_for_status(page, "Done")
        assert page.inner_text("#transcript") == text

        page.click(".controls summary")  # the options are folded away
        page.select_option("#format", "verbose_json")
        page.click("#again")
        wait_for_status(page, "Done")
        assert page.inner_text("#transcript") == f"[0.00 → 0.70] {text}"

        # Ask about the same clip: /v1/chat/completions, streamed; a hostile question stays text.
        question = '<img src=x onerror="window.pwned=1"> what was said?'
        answer = alone(tiny, ask(question, path.read_bytes(), system=None), max_new_tokens=TOKENS)["text"]
        page.fill("#question", question)
        page.click("#ask")
        wait_for_status(page, "Answered")
        assert page.text_content("#answer") == answer and answer
        assert page.text_content("#asked") == f"Q: {question}"
        assert page.query_selector("img") is None and page.evaluate("window.pwned") is None

        # Record a second from Chromium's fake microphone; the webm upload goes through ffmpeg on the server.
        page.click("#record")
        wait_for_status(page, "Recording")
        page.wait_for_timeout(1200)
        page.click("#stop")
        wait_for_status(page, "Done: recording")
        assert page.inner_text("#transcript").startswith("[0.00 → ")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_web_page_answers_as_json_following_a_schema(tiny, tmp_path):
    """The page's "Answer as JSON" box sends OpenAI's response_format; the tiny untrained model would not write JSON
    by itself, so an answer that follows the schema comes from the constraint."""
    from tests.inference.test_structured import SCHEMA, follows_schema
    from tests.serving.test_chat import ask

    processor, model = tiny
    path = tmp_path / "page.wav"
    path.write_bytes(wav_bytes(make_clips((0.7,), seed=5)[0]))
    question = "The intent as JSON."
    with live_server(create_app(model, processor, settings(max_new_tokens=40))) as url, web_page(url) as page:
        messages = ask(question, path.read_bytes(), system=None)
        response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
        reply = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": messages,
                                                               "response_format": response_format}, timeout=60)
        expected = reply.json()["choices"][0]["message"]["content"]
        page.set_input_files("#file", str(path))
        wait_for_status(page, "Done")
        page.click("#json-options summary")
        page.fill("#schema", json.dumps(SCHEMA))
        page.fill("#question", question)
        page.click("#ask")
        wait_for_status(page, "Answered")
        assert page.text_content("#answer") == expected and follows_schema(expected)

        page.fill("#schema", "{not json")  # refused in the page, nothing sent
        page.click("#ask")
        assert wait_for_status(page, "Error").startswith("Error: the JSON schema is not valid JSON")
        page.fill("#schema", '{"type": "objekt"}')  # the server's 400, shown as the page's error
        page.click("#ask")
        page.wait_for_function("document.getElementById('status').textContent.includes('objekt')", timeout=30000)
        assert page.text_content("#status").startswith("Error: ")

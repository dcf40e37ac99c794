"""The server under hostile clients (issue 14, speechlm/serving/guard.py): every request on loopback, bounded in count
and time.

No test measures speed: timeouts are only safety bounds, and "the work stopped" is observed on the decoding loop.
"""

from __future__ import annotations

import io
import logging
import select
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

import speechlm.serving.batcher as batcher_module
from speechlm.serving import create_app
from speechlm.serving.guard import OneLineLogs
from tests.conftest import make_clips
from tests.serving.conftest import stopped_early
from tests.serving.test_app import ENDPOINT, live_server, post, settings, wav_bytes


@pytest.fixture(scope="module")
def tiny(build):
    return build("whisper", "qwen2")


def raw_multipart(name: bytes, data: bytes) -> tuple[bytes, str]:
    """A multipart body with the file name exactly as given (httpx would escape odd bytes)."""
    boundary = "hardening-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = head + name + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + tail
    return body, f"multipart/form-data; boundary={boundary}"


# ------------------------------------------------------------------------------------------------ 2: streaming limit
def test_chunked_upload_over_the_limit_is_413_before_it_is_read(tiny):
    processor, model = tiny
    total, piece = 64 * 2**20, b"\0" * 2**16
    with live_server(create_app(model, processor, settings(max_upload_bytes=1_000_000))) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST " + ENDPOINT.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n"
            )
            start = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
            sock.sendall(b"%x\r\n" % len(start) + start + b"\r\n")  # fmt: skip
            sent, answer = 0, b""
            deadline = time.monotonic() + 60
            while sent < total and time.monotonic() < deadline:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered while the upload was still going
                try:
                    sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                except OSError:
                    break  # the server closed the connection after answering
                sent += len(piece)
            sock.settimeout(30)
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < total // 2, f"the server read {sent} of {total} bytes before answering 413"


# ------------------------------------------------------------------------------------------------ 3: work bounds
def test_absurd_declared_sample_rates_are_400(tiny):
    processor, model = tiny
    with live_server(create_app(model, processor, settings())) as url:
        for rate in (1, 1000, 400_000):
            buffer = io.BytesIO()
            sf.write(buffer, np.zeros(1800, dtype=np.int16), rate, format="WAV", subtype="PCM_16")
            response = post(url, "tiny.wav", buffer.getvalue())
            assert response.status_code == 400, (rate, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_audio" and f"declared sample rate {rate} Hz" in error["message"]


def test_timeout_stops_the_decoding(tiny, slow_decoding):
    processor, model = tiny
    app = create_app(model, processor, settings(max_new_tokens=400, request_timeout=0.5))
    with live_server(app) as url:
        response = post(url, timeout=30)
        assert response.status_code == 504
        assert stopped_early(slow_decoding), "decoding went on after the 504"


def test_client_disconnect_stops_the_decoding(tiny, slow_decoding):
    processor, model = tiny
    app = create_app(model, processor, settings(max_new_tokens=400, request_timeout=60))
    with live_server(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            post(url, timeout=httpx.Timeout(30, read=1.0))  # the client gives up and closes the connection
        assert stopped_early(slow_decoding), "decoding went on after the client went away"
        assert httpx.get(url + "/health", timeout=10).json()["batching"]["pending"] == 0


# ------------------------------------------------------------------------------------------------ 4: connections
def test_stalled_connections_are_closed_and_good_requests_still_served(tiny):
    processor, model = tiny
    app = create_app(model, processor, settings(header_timeout=0.5, body_timeout=0.5, max_connections=40))
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        partial = []
        for _ in range(20):  # slowloris: headers that never end
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            partial.append(sock)
        stalled_body = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled_body.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
                             b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")  # fmt: skip
        try:
            for sock in partial:
                assert sock.recv(1024) == b""  # closed by the server (recv would time out after 10 s otherwise)
            answer = stalled_body.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        finally:
            for sock in partial + [stalled_body]:
                sock.close()
        # More connections than max_connections: the extra ones are closed at once instead of holding descriptors.
        crowd = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(60)]
        try:
            closed = sum(1 for sock in crowd[45:] if sock.recv(1) == b"")
            assert closed == 15
        finally:
            for sock in crowd:
                sock.close()
        assert post(url).status_code == 200


def test_concurrency_limit_is_503_with_retry_after(tiny, monkeypatch):
    processor, model = tiny
    inside, release = threading.Event(), threading.Event()
    real = batcher_module.transcribe_arrays

    def held(*args, **kwargs):
        inside.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(batcher_module, "transcribe_arrays", held)
    with live_server(create_app(model, processor, settings(max_concurrent_requests=1))) as url:
        first = threading.Thread(target=lambda: results.append(post(url).status_code))
        results: list[int] = []
        first.start()
        try:
            assert inside.wait(30)
            busy = post(url)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "server_busy"
        finally:
            release.set()
            first.join(30)
        assert results == [200]


def test_log_floods_become_one_rate_limited_line():
    log = logging.getLogger("speechlm.tests.flood")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    limits = OneLineLogs(interval=3600)
    log.addFilter(limits)
    try:
        for _ in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                log.exception("socket.accept() out of system resource")
        log.error("another kind of event")
    finally:
        log.removeHandler(handler)
        log.removeFilter(limits)
    assert [r.getMessage() for r in records] == [
        "socket.accept() out of system resource (OSError: [Errno 24] Too many open files)",
        "another kind of event",
    ]
    assert records[0].exc_info is None  # no traceback


# ------------------------------------------------------------------------------------------------ 6: names, 500s
def test_odd_upload_names_are_400(tiny):
    processor, model = tiny
    m4a = b"\0\0\0\x18ftypM4A " + b"\0" * 200
    with live_server(create_app(model, processor, settings())) as url:
        for name in (b"x." + b"a" * 300, b"clip.m4\0a", b"clip\x01.wav", b"x." + "é".encode() * 140):
            body, content_type = raw_multipart(name, m4a)
            response = httpx.post(url + ENDPOINT, content=body, headers={"Content-Type": content_type}, timeout=30)
            assert response.status_code == 400, (name[:20], response.text)
            assert response.json()["error"]["code"] == "invalid_filename"
            assert "/tmp" not in response.text
        assert post(url, "ordinary name (1).wav").status_code == 200


def test_internal_errors_are_a_generic_500(tiny, monkeypatch, caplog):
    processor, model = tiny

    def broken(*args, **kwargs):
        raise RuntimeError("boom in /tmp/secret-dir/model.bin")

    monkeypatch.setattr(batcher_module, "transcribe_arrays", broken)
    with caplog.at_level(logging.ERROR, logger="speechlm.serving.app"):
        with live_server(create_app(model, processor, settings())) as url:
            response = post(url)
            assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "secret" not in response.text and "RuntimeError" not in response.text
    reference = error["message"].split("reference ")[1].split(")")[0]
    lines = [r.getMessage() for r in caplog.records if reference in r.getMessage()]
    assert len(lines) == 1 and "RuntimeError: boom in /tmp/secret-dir/model.bin" in lines[0]


# ------------------------------------------------------------------------------------------------ 9: browsers
def test_other_web_origins_cannot_drive_the_server(tiny):
    processor, model = tiny
    app = create_app(model, processor, settings(allowed_origins=("https://app.example",)))
    with live_server(app) as url:
        data = wav_bytes(make_clips((0.5,))[0])

        def from_origin(origin):
            return httpx.post(url + ENDPOINT, files={"file": ("a.wav", data)}, headers={"Origin": origin}, timeout=30)

        refused = from_origin("https://evil.example")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "origin_not_allowed"
        assert from_origin("null").status_code == 403
        assert from_origin(url).status_code == 200  # the server's own page
        assert from_origin("https://app.example").status_code == 200


def test_upload_bodies_are_read_at_a_bounded_rate_past_the_burst(monkeypatch):
    """Past `upload_burst_bytes` the guard reads a body no faster than `max_upload_rate` (a client looping on
    25 MB uploads took a core from everyone): checked on the pauses it asks for, not on a clock."""
    import asyncio

    import speechlm.serving.guard as guard_module
    from speechlm.serving.guard import RequestGuard

    pauses: list[float] = []

    async def no_sleep(seconds):
        pauses.append(seconds)

    monkeypatch.setattr(guard_module.asyncio, "sleep", no_sleep)
    mb = 2**20
    messages = [{"type": "http.request", "body": b"\0" * mb, "more_body": i < 7} for i in range(8)]

    async def receive():
        return messages.pop(0)

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = []

    async def send(message):
        sent.append(message)

    guard = RequestGuard(app, settings(max_upload_bytes=100 * mb, max_upload_rate=2 * mb, upload_burst_bytes=2 * mb))
    scope = {"type": "http", "path": ENDPOINT, "method": "POST", "headers": []}
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 200
    # 8 MB, the last piece ends the body: pauses after pieces 3-7 (1 MB each past the 2 MB burst, at 2 MB/s).
    assert len(pauses) == 5 and 2.4 < max(pauses) <= 2.5, pauses

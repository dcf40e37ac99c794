"""`speechlm serve`: an OpenAI-compatible transcription server (FastAPI) with a small web page.

`POST /v1/audio/transcriptions` takes the same multipart form as OpenAI's endpoint, so the official `openai` client
and tools built on it work by changing `base_url`. Errors use OpenAI's shape, `{"error": {"message", "type", "code"}}`:
a bad upload is a 4xx with a message that names the file, never a crash, and the server keeps serving.

Decoding goes through one `DynamicBatcher` (concurrent requests share batches). Uploads longer than
`max_chunk_seconds` are cut on silence and their chunks join the same batches as everyone else's clips.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import secrets
import sys
import threading
import time
import unicodedata
import zlib
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..audio import AudioError, load_audio
from ..inference import (
    MIN_AUDIO_SECONDS,
    Segment,
    array_blocks,
    audio_positions,
    check_positions,
    new_token_budget,
    prompt_positions,
    segments_text,
    segments_to_srt,
    segments_to_vtt,
    split_on_silence,
)
from ..loading import add_loading_arguments
from .batcher import DynamicBatcher

STATIC_DIR = Path(__file__).parent / "static"
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
API_KEY_ENV = "SPEECHLM_API_KEY"
# Multipart framing around the file; a body larger than the upload limit plus this cannot be a valid request.
_MULTIPART_SLACK = 64 * 1024
# Longest upload name accepted (bytes of UTF-8): the file-system limit, since decoders may put it in a temp name.
MAX_FILENAME_BYTES = 255
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """What the server accepts and how it decodes; every field has a `speechlm serve` flag."""

    model_name: str = "speechlm"
    api_key: str | None = None
    max_upload_bytes: int = 25 * 1024 * 1024  # OpenAI's limit
    max_audio_seconds: float = 1800.0
    min_audio_seconds: float = MIN_AUDIO_SECONDS
    request_timeout: float = 300.0
    max_batch_size: int = 16
    batch_wait_ms: float = 10.0
    max_chunk_seconds: float = 25.0
    prompt: str | None = None
    max_new_tokens: int | None = None
    num_beams: int | None = None
    # Limits that keep one client from stalling the others (every one has a `speechlm serve` flag).
    max_prompt_chars: int = 2000
    max_prompt_tokens: int = 256
    min_sampling_rate: int = 4000  # declared rates outside this range are refused: 1 Hz makes 1.8 kB "30 minutes"
    max_sampling_rate: int = 384000
    max_concurrent_requests: int = 64  # transcription requests in flight; more get 503 + Retry-After
    max_connections: int = 512  # open sockets (file descriptors); more are closed at once
    header_timeout: float = 10.0  # seconds for a connection to finish sending a request's headers
    body_timeout: float = 30.0  # seconds the upload may stall between two pieces of its body
    keep_alive_timeout: float = 5.0
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the server's own that may POST


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        headers = ({"WWW-Authenticate": "Bearer"} if self.status == 401 else {}) | self.headers
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers or None)


def _check_api_key_header(header: str, api_key: str) -> None:
    scheme, _, token = header.partition(" ")
    if not header:
        raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def _check_origin(headers: dict[str, str], allowed: tuple[str, ...]) -> None:
    """Only the server's own page (and `allowed` origins) may drive it from a browser.

    Browsers name the page's origin on a cross-site POST, and a simple multipart POST needs no preflight: without
    this check any web page a local user opens could spend the server's CPU (the answer is unreadable to it, but
    the work is done). Clients outside a browser send no Origin and are not affected.
    """
    origin = headers.get("origin")
    if origin is None or origin in allowed or origin.partition("://")[2] == headers.get("host", ""):
        return
    raise APIError(403, f"Requests from the web origin {origin[:100]!r} are not allowed (see --allow-origin).",
                   code="origin_not_allowed")  # fmt: skip


def _check_filename(name: str) -> None:
    """Upload names end up in messages and, for some decoders, in a temp file's name: refuse odd ones up front."""
    odd = next((c for c in name if unicodedata.category(c)[0] == "C"), None)  # control, format, surrogate, ...
    if odd is not None:
        raise APIError(400, f"The upload's file name contains the character U+{ord(odd):04X}; rename the file.",
                       code="invalid_filename", param="file")  # fmt: skip
    if len(name.encode("utf-8")) > MAX_FILENAME_BYTES:
        raise APIError(400, f"The upload's file name is longer than {MAX_FILENAME_BYTES} bytes; rename the file.",
                       code="invalid_filename", param="file")  # fmt: skip


def _check_sampling_rate(data: bytes, name: str, settings: ServerSettings) -> None:
    """Refuse an absurd declared rate before decoding: 1,800 samples at 1 Hz would resample to 30 minutes of audio."""
    import soundfile as sf

    try:
        rate = sf.info(io.BytesIO(data)).samplerate
    except Exception:  # noqa: BLE001 - not a libsndfile format: ffmpeg decodes it at the encoder's rate
        return
    if not settings.min_sampling_rate <= rate <= settings.max_sampling_rate:
        raise APIError(
            400, f"{name}: declared sample rate {rate} Hz is outside {settings.min_sampling_rate}-"
            f"{settings.max_sampling_rate} Hz", code="invalid_audio", param="file",
        )  # fmt: skip


class _BodyRejected(Exception):
    """Raised from `receive` to stop reading a request body (too large, stalled); the guard sends the answer."""


class RequestGuard:
    """ASGI middleware: what must hold before and while a request's body is read, and what a failure may say.

    On `/v1/`: the API key, the browser origin, a limit on requests in flight (503 + Retry-After), the upload limit
    counted on the bytes as they arrive (chunked or not, nothing past the limit is read or spooled) and a stall
    timeout on the body. Everywhere: an internal error answers a generic 500 with a reference; the details go to
    the log (one line), never to the client.
    """

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.settings
        guarded = scope["path"].startswith("/v1/")
        started = False
        rejected: APIError | None = None
        received, body_done = 0, False
        limit = settings.max_upload_bytes + _MULTIPART_SLACK

        async def guarded_receive():
            nonlocal received, body_done, rejected
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), settings.body_timeout)
            except TimeoutError:
                rejected = APIError(408, f"The upload stalled for more than {settings.body_timeout:g} s.",
                                    code="request_timeout", headers={"Connection": "close"})  # fmt: skip
                raise _BodyRejected from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    rejected = _too_large(settings, None)
                    raise _BodyRejected
            return message

        async def guarded_send(message):
            nonlocal started
            if rejected is not None:
                return  # the app's answer to a body that was cut off is replaced by the guard's
            started = started or message["type"] == "http.response.start"
            await send(message)

        counted = False
        try:
            if guarded:
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                if settings.api_key:
                    _check_api_key_header(headers.get("authorization", ""), settings.api_key)
                _check_origin(headers, settings.allowed_origins)
                length = headers.get("content-length", "")
                if length.isdigit() and int(length) > limit:
                    raise _too_large(settings, int(length))
                if self.active >= settings.max_concurrent_requests:
                    raise APIError(503, f"The server is busy ({self.active} requests in flight); retry shortly.",
                                   type="server_error", code="server_busy", headers={"Retry-After": "1"})  # fmt: skip
                self.active, counted = self.active + 1, True
            await self.app(scope, guarded_receive if guarded else receive, guarded_send)
        except _BodyRejected:
            pass
        except APIError as error:
            rejected = error
        except Exception as error:  # noqa: BLE001 - the client gets a reference, the log gets the details
            reference = secrets.token_hex(4)
            logger.error("internal error %s on %s %s: %s: %s", reference, scope.get("method"), scope["path"],
                         type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "")  # fmt: skip
            logger.debug("internal error %s", reference, exc_info=error)
            if not started:
                message = f"Internal server error (reference {reference}); the server log has the details."
                rejected = APIError(500, message, type="server_error")
        finally:
            if counted:
                self.active -= 1
        if rejected is not None and not started:
            answer, rejected = rejected, None
            await answer.response()(scope, receive, guarded_send)


def _too_large(settings: ServerSettings, size: int | None) -> APIError:
    limit = settings.max_upload_bytes / 1024 / 1024
    what = f"Upload of {size / 1024 / 1024:.1f} MB is" if size is not None else "Upload is"
    return APIError(413, f"{what} larger than the {limit:g} MB limit.", code="file_too_large", param="file",
                    headers={"Connection": "close"})  # fmt: skip


class OneLineLogs(logging.Filter):
    """One line per event, at most one per kind every `interval` seconds, with a count of those dropped.

    Under a flood (failed accepts, broken connections) uvicorn and asyncio log a traceback per event: 50,671 of
    them (20 MB) in 25 s were seen, which hides everything else and fills the disk.
    """

    def __init__(self, interval: float = 10.0):
        super().__init__()
        self.interval = interval
        self._last: dict[tuple, float] = {}
        self._dropped: dict[tuple, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        key = (record.name, str(record.msg), type(error).__name__ if error is not None else None)
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self.interval) < self.interval:
                self._dropped[key] = self._dropped.get(key, 0) + 1
                return False
            self._last[key] = now
            dropped = self._dropped.pop(key, 0)
        if error is not None or dropped:
            message = record.getMessage().splitlines()[0] if record.getMessage() else ""
            if error is not None:
                message += f" ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})"
            if dropped:
                message += f" [{dropped} more like this in the last {self.interval:g} s]"
            record.msg, record.args, record.exc_info, record.exc_text = message, None, None, None
        return True


def install_log_limits(interval: float = 10.0) -> OneLineLogs:
    """Put `OneLineLogs` on the loggers that flood under attack (uvicorn's error log, asyncio, ours)."""
    limits = OneLineLogs(interval)
    for name in ("uvicorn.error", "asyncio", __name__):
        logging.getLogger(name).addFilter(limits)
    return limits


def _compression_ratio(text: str) -> float:
    """Whisper's repetition signal: raw bytes over zlib-compressed bytes (loops of the same words compress well)."""
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 3) if data else 0.0


def _render(fmt: str, segments: list[Segment], duration: float, language: str | None, temperature: float,
            tokenizer) -> Response:  # fmt: skip
    text = segments_text(segments)
    usage = {"type": "duration", "seconds": round(duration, 3)}
    if fmt == "json":
        return JSONResponse({"text": text, "usage": usage})
    if fmt == "text":
        return PlainTextResponse(text + "\n")
    if fmt == "srt":
        return PlainTextResponse(segments_to_srt(segments))
    if fmt == "vtt":
        return PlainTextResponse(segments_to_vtt(segments), media_type="text/vtt")
    items = [
        {
            "id": index,
            "seek": round(segment.start * 100),  # in 10 ms frames, as Whisper counts
            "start": segment.start,
            "end": segment.end,
            "text": segment.text,
            "tokens": tokenizer(segment.text, add_special_tokens=False)["input_ids"] if segment.text else [],
            "temperature": temperature,
            "compression_ratio": _compression_ratio(segment.text),
        }
        for index, segment in enumerate(segments)
    ]
    return JSONResponse(
        {"task": "transcribe", "language": language or "unknown", "duration": round(duration, 3), "text": text,
         "segments": items, "usage": usage}
    )  # fmt: skip


def create_app(model, processor, settings: ServerSettings | None = None) -> FastAPI:
    """The server around an already loaded (processor, model); tests and `speechlm serve` both build it here."""
    settings = settings or ServerSettings()
    batcher = DynamicBatcher(model, processor, settings.max_batch_size, settings.batch_wait_ms)
    sampling_rate = processor.sampling_rate

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="SpeechLM", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.batcher = batcher
    app.state.started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ())[1:]) or "request"
            problems.append(f"{where}: {item.get('msg', 'invalid')}")
        field = str(error.errors()[0].get("loc", ("", ""))[-1]) if error.errors() else None
        return APIError(400, "; ".join(problems) or "invalid request", param=field).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), type=kind).response()

    app.add_middleware(RequestGuard, settings=settings)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "auth_required": bool(settings.api_key),
                "batching": batcher.stats()}  # fmt: skip

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": app.state.started, "owned_by": "speechlm"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != settings.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
        return model_card()

    async def decode(audio, prompt: str | None, generate_kwargs: dict) -> list[Segment]:
        duration = len(audio) / sampling_rate
        if duration <= settings.max_chunk_seconds:
            text = await batcher.transcribe(audio, prompt, **generate_kwargs)
            return [Segment(0.0, round(duration, 3), text)]
        stop = threading.Event()  # set when the request is abandoned: the silence splitting stops too

        def blocks():
            for block in array_blocks(audio, 4.0, sampling_rate):
                if stop.is_set():
                    return
                yield block

        # A long upload has at most one batch of chunks queued at a time, so others' clips join the next batch.
        slots = asyncio.Semaphore(settings.max_batch_size)

        async def one(chunk) -> str:
            async with slots:
                return await batcher.transcribe(chunk.audio, prompt, **generate_kwargs)

        try:
            # vad_threads=None: the batcher's thread is decoding meanwhile, and torch's thread count is process-wide.
            chunks = await run_in_threadpool(
                lambda: list(split_on_silence(blocks(), sampling_rate, max_chunk_seconds=settings.max_chunk_seconds,
                                              vad_threads=None))
            )  # fmt: skip
            texts = await asyncio.gather(*(one(c) for c in chunks))
        except asyncio.CancelledError:
            stop.set()
            raise
        return [Segment(round(c.start, 3), round(c.end, 3), text) for c, text in zip(chunks, texts)]

    def check_prompt(prompt: str | None, samples: int, generate_kwargs: dict) -> None:
        """Prompt limits and audio + prompt + new tokens vs the LLM's positions, before any work is queued."""
        if prompt is not None and len(prompt) > settings.max_prompt_chars:
            raise APIError(400, f"prompt has {len(prompt)} characters, more than the limit of "
                           f"{settings.max_prompt_chars}", code="prompt_too_long", param="prompt")  # fmt: skip
        tokens = prompt_positions(processor, prompt)
        if tokens > settings.max_prompt_tokens:
            raise APIError(400, f"prompt has {tokens} tokens, more than the limit of {settings.max_prompt_tokens}",
                           code="prompt_too_long", param="prompt")  # fmt: skip
        chunk = min(samples, round(settings.max_chunk_seconds * sampling_rate))
        try:
            check_positions(model, audio_positions(model, processor, chunk), tokens, new_token_budget(generate_kwargs),
                            "this request")  # fmt: skip
        except ValueError as error:
            raise APIError(400, str(error), code="context_length_exceeded", param="prompt") from None

    async def until_disconnected(request: Request) -> None:
        """Returns when the client goes away (the body is read by then, so the next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        request: Request,
        file: UploadFile = File(..., description="the audio file (wav, flac, ogg, mp3, m4a, webm, ...)"),
        model_name: str | None = Form(None, alias="model"),
        prompt: str | None = Form(None, description="instruction for the LLM (default: the server's)"),
        response_format: str = Form("json"),
        temperature: float = Form(0.0),
        language: str | None = Form(None, description="accepted for compatibility; the model is not told"),
    ):
        if response_format not in RESPONSE_FORMATS:
            raise APIError(
                400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got '{response_format}'",
                param="response_format",
            )  # fmt: skip
        if not 0.0 <= temperature <= 2.0:
            raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", param="temperature")
        name = file.filename or "upload"
        _check_filename(name)
        data = await file.read()
        if len(data) > settings.max_upload_bytes:
            raise _too_large(settings, len(data))
        prompt = prompt if prompt else settings.prompt
        if prompt is not None and len(prompt) > settings.max_prompt_chars:  # before any decoding work
            check_prompt(prompt, 0, {})
        _check_sampling_rate(data, name, settings)
        try:
            audio = await run_in_threadpool(
                load_audio, data, sampling_rate, name=name, min_seconds=settings.min_audio_seconds,
                max_seconds=settings.max_audio_seconds,
            )  # fmt: skip
        except AudioError as error:
            code = "audio_too_long" if "longer than max_seconds" in error.problem else "invalid_audio"
            raise APIError(400, str(error), code=code, param="file") from None
        generate_kwargs = {"max_new_tokens": settings.max_new_tokens, "num_beams": settings.num_beams}
        if temperature > 0:
            generate_kwargs.update(do_sample=True, temperature=temperature)
        check_prompt(prompt, len(audio), generate_kwargs)
        work = asyncio.ensure_future(asyncio.wait_for(decode(audio, prompt, generate_kwargs), settings.request_timeout))
        watch = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # the client went away (or this handler was cancelled): stop the decoding
                work.cancel()
                logger.info("client went away; transcription of %s cancelled", name[:100])
        try:
            segments = work.result()
        except asyncio.CancelledError:
            raise APIError(499, "client closed the request", code="client_closed_request") from None
        except TimeoutError:
            raise APIError(
                504, f"Transcribing {name} took longer than the {settings.request_timeout:g} s request timeout.",
                type="timeout", code="request_timeout",
            ) from None  # fmt: skip
        except ValueError as error:  # the model refused the clip (e.g. shorter than the encoder's receptive field)
            raise APIError(400, f"{name}: {error}", code="invalid_audio", param="file") from None
        duration = len(audio) / sampling_rate
        return _render(response_format, segments, duration, language, temperature, processor.tokenizer)

    return app


# --------------------------------------------------------------------------------------------------------------------
# `speechlm serve`


def guarded_http_protocol(settings: ServerSettings):
    """uvicorn's h11 protocol with the two limits uvicorn lacks: a deadline for a request's headers and a cap on
    open connections.

    uvicorn times out idle keep-alive connections, but a connection that sends part of its headers and stalls
    (slowloris) is held forever: 1,124 of them exhausted the file descriptors. Connections past
    `settings.max_connections` are closed at once instead of holding a descriptor each.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > settings.max_connections:
                logger.warning("more than %d open connections; closing new ones", settings.max_connections)
                transport.close()
                return
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()  # the next request on this keep-alive connection

        def connection_lost(self, exc) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            self._header_deadline = self.loop.call_later(settings.header_timeout, self._headers_overdue)

        def _headers_overdue(self) -> None:
            waiting_for_headers = self.cycle is None or self.cycle.response_complete
            if waiting_for_headers and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **kwargs):
    """uvicorn's settings for `app` with its connection hygiene (tests run the server through this too)."""
    import uvicorn

    settings: ServerSettings = app.state.settings
    options = dict(http=guarded_http_protocol(settings), timeout_keep_alive=settings.keep_alive_timeout,
                   h11_max_incomplete_event_size=16 * 1024, log_level="info")  # fmt: skip
    return uvicorn.Config(app, host=host, port=port, **(options | kwargs))


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning printed when the server listens beyond loopback without an API key (None when it does not)."""
    if api_key or host in LOOPBACK_HOSTS:
        return None
    return (f"WARNING: listening on {host} without an API key: anyone who can reach this port can run "
            f"transcriptions. Set --api-key (or {API_KEY_ENV}), or serve on 127.0.0.1.")  # fmt: skip


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerSettings()
    parser.add_argument("--model", required=True, help="model folder (model + processor, as saved by training)")
    parser.add_argument("--model-name", default=None, help="id in /v1/models (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="1 disables batching")
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms)
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 1024 / 1024)
    parser.add_argument("--max-audio-seconds", type=float, default=defaults.max_audio_seconds)
    parser.add_argument("--min-audio-seconds", type=float, default=defaults.min_audio_seconds)
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout, help="seconds")
    parser.add_argument("--max-chunk-seconds", type=float, default=defaults.max_chunk_seconds)
    parser.add_argument("--prompt", default=None, help="default instruction (a request's `prompt` overrides it)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    add_loading_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars)
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    parser.add_argument("--max-concurrent-requests", type=int, default=defaults.max_concurrent_requests,
                        help="transcription requests in flight; more get 503 with Retry-After")  # fmt: skip
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections; more are closed at once (keep below `ulimit -n`)")  # fmt: skip
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout, help="seconds")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout,
                        help="seconds an upload may stall between two pieces")  # fmt: skip
    parser.add_argument("--keep-alive-timeout", type=float, default=defaults.keep_alive_timeout, help="seconds")
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (e.g. https://app.example) whose pages may call the API; repeatable",
    )


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        model_name=args.model_name or Path(args.model).resolve().name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_audio_seconds=args.max_audio_seconds,
        min_audio_seconds=args.min_audio_seconds,
        request_timeout=args.request_timeout,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_chunk_seconds=args.max_chunk_seconds,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        max_prompt_chars=args.max_prompt_chars,
        max_prompt_tokens=args.max_prompt_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        allowed_origins=tuple(args.allow_origin),
    )


def run_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ..inference import load_for_inference

    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor, model = load_for_inference(args, device)
    app = create_app(model, processor, settings)
    shown = {k: v for k, v in asdict(settings).items() if k != "api_key"}
    print(f"serving {args.model} on http://{args.host}:{args.port} ({device}); auth: {bool(settings.api_key)}; {shown}")
    if warning := exposure_warning(args.host, settings.api_key):
        print(warning, file=sys.stderr)
    install_log_limits()
    uvicorn.Server(uvicorn_config(app, args.host, args.port)).run()
    return 0


add_arguments = add_serve_arguments
run = run_serve

__all__ = [
    "APIError",
    "RequestGuard",
    "ServerSettings",
    "create_app",
    "run_serve",
    "add_serve_arguments",
    "uvicorn_config",
]

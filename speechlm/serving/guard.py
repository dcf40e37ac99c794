"""What protects the server from its clients: API key, origins, upload and connection limits, errors without leaks.

Everything here answers in OpenAI's error shape (`APIError`) and holds for every `/v1/` endpoint, transcription and
chat alike (issue 14).
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import itertools
import logging
import secrets
import threading
import time
import unicodedata

from fastapi.responses import JSONResponse

from .settings import ServerSettings

# The flow (fair share in the batcher) the current request's clips are charged to: set per API request by
# `RequestGuard`, read by the batcher (defined here so that the guard does not import the batcher).
request_flow: contextvars.ContextVar[object | None] = contextvars.ContextVar("speechlm_request_flow", default=None)

# Multipart framing around the file; a body larger than the upload limit plus this cannot be a valid request.
_MULTIPART_SLACK = 64 * 1024
# Longest upload name accepted (bytes of UTF-8): the file-system limit, since decoders may put it in a temp name.
MAX_FILENAME_BYTES = 255
logger = logging.getLogger(__name__)


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


def check_filename(name: str) -> None:
    """Upload names end up in messages and, for some decoders, in a temp file's name: refuse odd ones up front."""
    odd = next((c for c in name if unicodedata.category(c)[0] == "C"), None)  # control, format, surrogate, ...
    if odd is not None:
        raise APIError(400, f"The upload's file name contains the character U+{ord(odd):04X}; rename the file.",
                       code="invalid_filename", param="file")  # fmt: skip
    if len(name.encode("utf-8")) > MAX_FILENAME_BYTES:
        raise APIError(400, f"The upload's file name is longer than {MAX_FILENAME_BYTES} bytes; rename the file.",
                       code="invalid_filename", param="file")  # fmt: skip


def check_sampling_rate(data: bytes, name: str, settings: ServerSettings, param: str = "file") -> None:
    """Refuse an absurd declared rate before decoding: 1,800 samples at 1 Hz would resample to 30 minutes of audio."""
    import soundfile as sf

    try:
        rate = sf.info(io.BytesIO(data)).samplerate
    except Exception:  # noqa: BLE001 - not a libsndfile format: ffmpeg decodes it at the encoder's rate
        return
    if not settings.min_sampling_rate <= rate <= settings.max_sampling_rate:
        raise APIError(
            400, f"{name}: declared sample rate {rate} Hz is outside {settings.min_sampling_rate}-"
            f"{settings.max_sampling_rate} Hz", code="invalid_audio", param=param,
        )  # fmt: skip


class _BodyRejected(Exception):
    """Raised from `receive` to stop reading a request body (too large, stalled); the guard sends the answer."""


class RequestGuard:
    """ASGI middleware: what must hold before and while a request's body is read, and what a failure may say.

    On `/v1/`: the API key, the browser origin, a limit on requests in flight (503 + Retry-After), the upload limit
    counted on the bytes as they arrive (chunked or not, nothing past the limit is read or spooled), a read rate
    past the first megabytes (`max_upload_rate`) and a stall timeout on the body. Everywhere: an internal error
    answers a generic 500 with a reference; the details go to the log (one line), never to the client.
    """

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self.active = 0
        self._requests = itertools.count()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.settings
        guarded = scope["path"].startswith("/v1/")
        started = False
        rejected: APIError | None = None
        received, body_done = 0, False
        limit = settings.max_upload_bytes + _MULTIPART_SLACK
        body_started = time.monotonic()

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
                    rejected = too_large(settings, None)
                    raise _BodyRejected
                if settings.max_upload_rate and received > settings.upload_burst_bytes and not body_done:
                    # Not reading is the throttle: uvicorn stops reading the socket and TCP slows the sender.
                    due = body_started + (received - settings.upload_burst_bytes) / settings.max_upload_rate
                    if (wait := due - time.monotonic()) > 0:
                        await asyncio.sleep(wait)
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
                    raise too_large(settings, int(length))
                if self.active >= settings.max_concurrent_requests:
                    raise APIError(503, f"The server is busy ({self.active} requests in flight); retry shortly.",
                                   type="server_error", code="server_busy", headers={"Retry-After": "1"})  # fmt: skip
                self.active, counted = self.active + 1, True
                request_flow.set(("request", next(self._requests)))  # the batcher's fair share is per request
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


def too_large(settings: ServerSettings, size: int | None) -> APIError:
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
    for name in ("uvicorn.error", "asyncio", "speechlm.serving.app", __name__, "speechlm.serving.chat"):
        logging.getLogger(name).addFilter(limits)
    return limits


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


async def decode_upload(data: bytes, name: str, sampling_rate: int, settings: ServerSettings, param: str = "file",
                        max_seconds: float | None = None):  # fmt: skip
    """Bytes of an audio file -> mono float32 at `sampling_rate`, or a 400 naming `name` (any endpoint's audio)."""
    from starlette.concurrency import run_in_threadpool

    from ..audio import AudioError, load_audio

    if len(data) > settings.max_upload_bytes:
        raise too_large(settings, len(data))
    check_sampling_rate(data, name, settings, param)
    try:
        return await run_in_threadpool(
            load_audio, data, sampling_rate, name=name, min_seconds=settings.min_audio_seconds,
            max_seconds=settings.max_audio_seconds if max_seconds is None else max_seconds,
        )  # fmt: skip
    except AudioError as error:
        code = "audio_too_long" if "longer than max_seconds" in error.problem else "invalid_audio"
        raise APIError(400, str(error), code=code, param=param) from None


async def until_disconnected(request) -> None:
    """Returns when the client goes away (the body is read by then, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def first_or_disconnect(request, work: asyncio.Future, what: str):
    """Await `work` unless the client goes away first; then cancel it (the decoding stops) and answer 499."""
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():  # the client went away (or this handler was cancelled): stop the decoding
            work.cancel()
            logger.info("client went away; %s cancelled", what[:100])
    try:
        return work.result()
    except asyncio.CancelledError:
        raise APIError(499, "client closed the request", code="client_closed_request") from None

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
import os
import secrets
import time
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
    segments_text,
    segments_to_srt,
    segments_to_vtt,
    split_on_silence,
)
from .batcher import DynamicBatcher

STATIC_DIR = Path(__file__).parent / "static"
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
API_KEY_ENV = "SPEECHLM_API_KEY"
# Multipart framing around the file; a body larger than the upload limit plus this cannot be a valid request.
_MULTIPART_SLACK = 64 * 1024


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


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def _check_api_key(request: Request, api_key: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


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

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """API key and upload size are checked from the headers, before a large body is read and parsed."""
        if request.url.path.startswith("/v1/"):
            try:
                if settings.api_key:
                    _check_api_key(request, settings.api_key)
                length = request.headers.get("content-length")
                if length and length.isdigit() and int(length) > settings.max_upload_bytes + _MULTIPART_SLACK:
                    raise _too_large(int(length))
            except APIError as error:
                return error.response()
        return await call_next(request)

    def _too_large(size: int) -> APIError:
        limit = settings.max_upload_bytes / 1024 / 1024
        return APIError(
            413, f"Upload of {size / 1024 / 1024:.1f} MB is larger than the {limit:g} MB limit.",
            code="file_too_large", param="file",
        )  # fmt: skip

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
        # vad_threads=None: the batcher's thread is decoding meanwhile, and torch's thread count is process-wide.
        chunks = await run_in_threadpool(
            lambda: list(split_on_silence(array_blocks(audio, 4.0, sampling_rate), sampling_rate,
                                          max_chunk_seconds=settings.max_chunk_seconds, vad_threads=None))
        )  # fmt: skip
        texts = await asyncio.gather(*(batcher.transcribe(c.audio, prompt, **generate_kwargs) for c in chunks))
        return [Segment(round(c.start, 3), round(c.end, 3), text) for c, text in zip(chunks, texts)]

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
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
        data = await file.read()
        if len(data) > settings.max_upload_bytes:
            raise _too_large(len(data))
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
        prompt = prompt if prompt else settings.prompt
        try:
            segments = await asyncio.wait_for(decode(audio, prompt, generate_kwargs), settings.request_timeout)
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
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")


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
    )


def run_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ..inference import load_pretrained

    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor, model = load_pretrained(args.model, dtype=args.dtype, device=device)
    app = create_app(model, processor, settings)
    shown = {k: v for k, v in asdict(settings).items() if k != "api_key"}
    print(f"serving {args.model} on http://{args.host}:{args.port} ({device}); auth: {bool(settings.api_key)}; {shown}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


add_arguments = add_serve_arguments
run = run_serve

__all__ = ["APIError", "ServerSettings", "create_app", "run_serve", "add_serve_arguments"]

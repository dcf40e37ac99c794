"""`speechlm serve`: an OpenAI-compatible transcription and chat-with-audio server (FastAPI) with a small web page.

`POST /v1/audio/transcriptions` takes the same multipart form as OpenAI's endpoint (`stream=true` answers
`transcript.text.delta` / `transcript.text.done` events), and `POST /v1/chat/completions` (`chat.py`) takes messages
with `input_audio` parts, so the official `openai` client and tools built on it work by changing `base_url`.
OpenAI's `prompt` is context the model reads (see `render_prompt`); the LLM's instruction is the SpeechLM extension
field `instructions`. Errors use OpenAI's shape, `{"error": {"message", "type", "code"}}`:
a bad upload is a 4xx with a message that names the file, never a crash, and the server keeps serving.

Decoding goes through one `DynamicBatcher` (concurrent requests share batches). Uploads longer than
`max_chunk_seconds` are cut on silence and their chunks join the same batches as everyone else's clips.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
import zlib
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..cli_options import (
    add_decoding_arguments,
    add_joint_ctc_argument,
    add_model_arguments,
    add_prefer_quoted_argument,
    generation_options,
)
from ..factory import AUDIO_TOKEN
from ..inference.decoding import (
    audio_positions,
    beam_width,
    check_positions,
    new_token_budget,
    prompt_positions,
)
from ..inference.formats import Segment, segments_text, segments_to_srt, segments_to_vtt
from ..inference.segmentation import array_blocks, split_on_silence
from .batcher import DynamicBatcher
from .chat import add_chat_routes
from .guard import (
    APIError,
    OneLineLogs,
    RequestGuard,
    check_filename,
    decode_upload,
    first_or_disconnect,
    guarded_http_protocol,
    install_log_limits,
)
from .settings import ServerSettings
from .streaming import EventPump, sse, start_event_stream, stream_error

STATIC_DIR = Path(__file__).parent / "static"
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAM_FORMATS = ("json", "text")
# Form fields of OpenAI's transcription request that this server honours (others are a 400, never ignored).
TRANSCRIPTION_FIELDS = {"file", "model", "prompt", "instructions", "response_format", "temperature", "language",
                        "stream", "timestamp_granularities", "chunking_strategy"}  # fmt: skip
API_KEY_ENV = "SPEECHLM_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
logger = logging.getLogger(__name__)


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
    if settings.joint_ctc_weight is None:
        settings = replace(settings, joint_ctc_weight=getattr(model, "joint_ctc_weight", 0.0))
    elif settings.joint_ctc_weight and getattr(model, "ctc_head", None) is None:
        raise ValueError("joint_ctc_weight needs a model with a CTC head; this one has none")
    if settings.prefer_quoted and (beams := beam_width(model, settings.num_beams)) < 2:
        raise ValueError(f"prefer_quoted chooses among beams: give num_beams >= 2 (this model decodes with {beams})")
    batcher = DynamicBatcher(model, processor, settings.max_batch_size, settings.batch_wait_ms,
                             settings.max_batch_audio_seconds)  # fmt: skip
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

    async def decode(audio, prompt: str | None, generate_kwargs: dict, sink=None) -> list[Segment]:
        """Segments of `audio`; `sink` gets the text as it comes: token by token for one chunk, else chunk by chunk."""
        duration = len(audio) / sampling_rate
        if duration <= settings.max_chunk_seconds:
            text = await batcher.transcribe(audio, prompt, sink=sink, **generate_kwargs)
            return [Segment(0.0, round(duration, 3), text)]
        stop = threading.Event()  # set when the request is abandoned: the silence splitting stops too

        def blocks():
            for block in array_blocks(audio, 4.0, sampling_rate):
                if stop.is_set():
                    return
                with batcher.turn(len(block) / sampling_rate, stop):  # splitting waits its turn with decoding
                    yield block

        # A long upload has at most one batch of chunks queued at a time, so others' clips join the next batch.
        slots = asyncio.Semaphore(settings.max_batch_size)

        async def one(chunk) -> str:
            async with slots:
                return await batcher.transcribe(chunk.audio, prompt, **generate_kwargs)

        tasks: list[asyncio.Future] = []
        try:
            # vad_threads=None: the batcher's thread is decoding meanwhile, and torch's thread count is process-wide.
            chunks = await run_in_threadpool(
                lambda: list(split_on_silence(blocks(), sampling_rate, max_chunk_seconds=settings.max_chunk_seconds,
                                              vad_threads=None))
            )  # fmt: skip
            tasks = [asyncio.ensure_future(one(c)) for c in chunks]
            texts, said = [], False
            for task in tasks:  # in order, so a streaming client reads the chunks' texts as they are settled
                texts.append(await task)
                if sink is not None and texts[-1]:
                    sink((" " if said else "") + texts[-1])
                    said = True
        except BaseException:
            stop.set()
            for task in tasks:
                task.cancel()
            raise
        return [Segment(round(c.start, 3), round(c.end, 3), text) for c, text in zip(chunks, texts)]

    def render_prompt(instructions: str | None, hint: str | None, language: str | None) -> str | None:
        """The LLM's prompt: the instruction (the model's trained one unless `instructions` replaces it), then
        OpenAI's `language` and `prompt` as context lines the model reads. None: the processor's default prompt."""
        if not hint and not language:
            return instructions
        lines = [processor.prompt if instructions is None else instructions]
        lines += [f"Language: {language}"] if language else []
        lines += [f"Context: {hint}"] if hint else []
        return "\n".join(line for line in lines if line)

    def check_text_limits(fields: dict[str, str | None]) -> None:
        """Characters per field, before any work (a 60k-character prompt stalled everyone once)."""
        for param, value in fields.items():
            if value is not None and AUDIO_TOKEN in value:
                raise APIError(400, f"{param} contains the audio placeholder {AUDIO_TOKEN}", param=param)
            if value is not None and len(value) > settings.max_prompt_chars:
                raise APIError(400, f"{param} has {len(value)} characters, more than the limit of "
                               f"{settings.max_prompt_chars}", code="prompt_too_long", param=param)  # fmt: skip

    def check_prompt(prompt: str | None, samples: int, generate_kwargs: dict, param: str = "prompt") -> None:
        """Prompt tokens and audio + prompt + new tokens vs the LLM's positions, before any work is queued."""
        tokens = prompt_positions(processor, prompt)
        if tokens > settings.max_prompt_tokens:
            raise APIError(400, f"{param} has {tokens} tokens, more than the limit of {settings.max_prompt_tokens}",
                           code="prompt_too_long", param=param)  # fmt: skip
        chunk = min(samples, round(settings.max_chunk_seconds * sampling_rate))
        try:
            check_positions(model, audio_positions(model, processor, chunk), tokens,
                            new_token_budget(generate_kwargs, model), "this request")  # fmt: skip
        except ValueError as error:
            raise APIError(400, str(error), code="context_length_exceeded", param=param) from None

    def check_form(form, response_format: str, stream: bool) -> None:
        """OpenAI parameters this server cannot honour are a 400, never a silent no-op."""
        granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
        for value in granularities:
            if value == "word":
                raise APIError(400, "timestamp_granularities 'word' is not supported: SpeechLM has no word-level "
                               "alignment; use ['segment'] (segments are cut on silence)",
                               code="unsupported_parameter", param="timestamp_granularities")  # fmt: skip
            if value != "segment":
                raise APIError(400, f"timestamp_granularities must be 'segment', got {value[:40]!r}",
                               param="timestamp_granularities")  # fmt: skip
        if granularities and response_format != "verbose_json":
            raise APIError(400, "timestamp_granularities needs response_format 'verbose_json'",
                           param="timestamp_granularities")  # fmt: skip
        if stream and response_format not in STREAM_FORMATS:
            raise APIError(400, f"stream=true sends text events; response_format must be one of "
                           f"{', '.join(STREAM_FORMATS)}, got '{response_format}'", param="stream")  # fmt: skip
        strategy = form.get("chunking_strategy")
        if strategy is not None and strategy != "auto":
            raise APIError(400, "chunking_strategy must be 'auto' (uploads longer than the encoder's window are cut "
                           "on silence by a VAD)", code="unsupported_parameter", param="chunking_strategy")  # fmt: skip
        for key in form.keys():
            if key not in TRANSCRIPTION_FIELDS and key != "timestamp_granularities[]":
                raise APIError(400, f"parameter '{key[:60]}' is not supported by this server",
                               code="unsupported_parameter", param=key[:60])  # fmt: skip

    def decode_error(error: Exception, name: str) -> Exception:
        if isinstance(error, TimeoutError):
            return APIError(504, f"Transcribing {name} took longer than the {settings.request_timeout:g} s request "
                            "timeout.", type="timeout", code="request_timeout")  # fmt: skip
        if isinstance(error, ValueError):  # the model refused the clip (e.g. shorter than the encoder's field)
            return APIError(400, f"{name}: {error}", code="invalid_audio", param="file")
        return error

    async def stream_transcription(request: Request, audio, prompt, generate_kwargs: dict, name: str):
        """OpenAI's transcription events: `transcript.text.delta` as text is decoded, then `transcript.text.done`."""
        pump = EventPump(settings.request_timeout)
        work = asyncio.ensure_future(decode(audio, prompt, generate_kwargs, sink=pump.sink))

        async def events():
            started = False
            try:
                async for delta in pump.run(work):
                    started = True
                    yield sse({"type": "transcript.text.delta", "delta": delta})
                yield sse({"type": "transcript.text.done", "text": segments_text(work.result())})
            except Exception as error:  # noqa: BLE001 - before the first event the client gets a normal error
                error = decode_error(error, name)
                if not started:
                    raise error from None
                yield sse(stream_error(error, logger))

        return await start_event_stream(request, events(), f"transcription of {name}")

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        request: Request,
        file: UploadFile = File(..., description="the audio file (wav, flac, ogg, mp3, m4a, webm, ...)"),
        model_name: str | None = Form(None, alias="model"),
        prompt: str | None = Form(None, description="context for the transcript (previous text, spellings)"),
        instructions: str | None = Form(None, description="SpeechLM extension: replaces the LLM's instruction"),
        response_format: str = Form("json"),
        temperature: float = Form(0.0),
        language: str | None = Form(None, description="ISO-639 code, told to the model as context"),
        stream: bool = Form(False, description="server-sent transcript.text.delta / transcript.text.done events"),
    ):
        if response_format not in RESPONSE_FORMATS:
            raise APIError(
                400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got '{response_format}'",
                param="response_format",
            )  # fmt: skip
        if not 0.0 <= temperature <= 2.0:
            raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", param="temperature")
        if language is not None and not (language.isascii() and language.isalpha() and 2 <= len(language) <= 3):
            raise APIError(400, f"language must be an ISO-639 code such as 'en', got {language[:40]!r}",
                           param="language")  # fmt: skip
        check_form(await request.form(), response_format, stream)
        name = file.filename or "upload"
        check_filename(name)
        instructions = instructions if instructions else settings.prompt
        check_text_limits({"prompt": prompt, "instructions": instructions})  # before any decoding work
        audio = await decode_upload(await file.read(), name, sampling_rate, settings)
        generate_kwargs = {"max_new_tokens": settings.max_new_tokens, "num_beams": settings.num_beams}
        if settings.joint_ctc_weight:
            generate_kwargs["joint_ctc_weight"] = settings.joint_ctc_weight
        if temperature > 0:
            generate_kwargs.update(do_sample=True, temperature=temperature)
        llm_prompt = render_prompt(instructions, prompt, language)
        check_prompt(llm_prompt, len(audio), generate_kwargs, "prompt" if prompt else "instructions")
        if stream:
            return await stream_transcription(request, audio, llm_prompt, generate_kwargs, name)
        work = asyncio.ensure_future(asyncio.wait_for(decode(audio, llm_prompt, generate_kwargs),
                                                      settings.request_timeout))  # fmt: skip
        try:
            segments = await first_or_disconnect(request, work, f"transcription of {name}")
        except (TimeoutError, ValueError) as error:
            raise decode_error(error, name) from None
        duration = len(audio) / sampling_rate
        return _render(response_format, segments, duration, language, temperature, processor.tokenizer)

    add_chat_routes(app, model, processor, settings, batcher)
    return app


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
    """`speechlm serve`'s flags: the shared model and decoding options (`speechlm.cli_options`; batching is the
    server's own, --max-batch-size) plus one flag per `ServerSettings` field, defaulting to the field's default."""
    defaults = ServerSettings()
    add_model_arguments(parser)
    add_decoding_arguments(parser, batch_size=False,
                           prompt_help="LLM instruction when a request has none in its `instructions` field "
                                       "(default: the processor's)")  # fmt: skip
    parser.add_argument("--model-name", default=None, help="id in /v1/models (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="1 disables batching")
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                        help="how long a batch waits for more requests")  # fmt: skip
    parser.add_argument("--max-batch-audio-seconds", type=float, default=defaults.max_batch_audio_seconds,
                        help="padded audio per batch (clips x the longest clip)")  # fmt: skip
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 1024 / 1024,
                        help="largest upload")  # fmt: skip
    parser.add_argument("--max-upload-rate-mb", type=float, default=defaults.max_upload_rate / 1024 / 1024,
                        help="MB/s a request's body is read at past its first --upload-burst-mb (0: unlimited)")
    parser.add_argument("--upload-burst-mb", type=float, default=defaults.upload_burst_bytes / 1024 / 1024,
                        help="MB of a body read at full speed")  # fmt: skip
    parser.add_argument("--max-audio-seconds", type=float, default=defaults.max_audio_seconds,
                        help="longest upload, in seconds of audio")  # fmt: skip
    parser.add_argument("--min-audio-seconds", type=float, default=defaults.min_audio_seconds,
                        help="shortest upload, in seconds of audio")  # fmt: skip
    parser.add_argument("--min-sampling-rate", type=int, default=defaults.min_sampling_rate,
                        help="lowest sample rate an upload may declare, in Hz")  # fmt: skip
    parser.add_argument("--max-sampling-rate", type=int, default=defaults.max_sampling_rate,
                        help="highest sample rate an upload may declare, in Hz")  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout, help="seconds")
    parser.add_argument("--max-chunk-seconds", type=float, default=defaults.max_chunk_seconds,
                        help="longer uploads are cut on silence (silero-vad) into chunks of at most this length")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars,
                        help="longest `prompt` / `instructions` field, in characters")  # fmt: skip
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens,
                        help="longest `prompt` / `instructions` field, in tokens")  # fmt: skip
    parser.add_argument("--max-concurrent-requests", type=int, default=defaults.max_concurrent_requests,
                        help="API requests in flight; more get 503 with Retry-After")  # fmt: skip
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections; more are closed at once (keep below `ulimit -n`)")  # fmt: skip
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout, help="seconds")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout,
                        help="seconds an upload may stall between two pieces")  # fmt: skip
    parser.add_argument("--keep-alive-timeout", type=float, default=defaults.keep_alive_timeout, help="seconds")
    parser.add_argument("--max-chat-clips", type=int, default=defaults.max_chat_clips, help="audio clips per chat")
    parser.add_argument("--max-chat-messages", type=int, default=defaults.max_chat_messages, help="messages per chat")
    parser.add_argument("--max-chat-chars", type=int, default=defaults.max_chat_chars, help="text of all messages")
    parser.add_argument("--max-chat-tokens", type=int, default=defaults.max_chat_tokens, help="text tokens of a chat")
    parser.add_argument("--max-completion-tokens", type=int, default=defaults.max_completion_tokens,
                        help="the largest max_tokens a chat request may ask for")  # fmt: skip
    add_joint_ctc_argument(parser, what="transcriptions (/v1/audio/transcriptions), and the transcript field of chat "
                           "answers about one clip held to a schema that opens with one (else chat uses the LLM alone)")
    add_prefer_quoted_argument(parser, "chat answers held to a response_format or structured_outputs schema")
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (e.g. https://app.example) whose pages may call the API; repeatable (default: only "
        "the server's own page)",
    )


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        model_name=args.model_name or Path(args.model).resolve().name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_upload_rate=args.max_upload_rate_mb * 1024 * 1024,
        upload_burst_bytes=int(args.upload_burst_mb * 1024 * 1024),
        max_audio_seconds=args.max_audio_seconds,
        min_audio_seconds=args.min_audio_seconds,
        min_sampling_rate=args.min_sampling_rate,
        max_sampling_rate=args.max_sampling_rate,
        request_timeout=args.request_timeout,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_batch_audio_seconds=args.max_batch_audio_seconds,
        max_chunk_seconds=args.max_chunk_seconds,
        prompt=args.prompt,
        **generation_options(args),
        joint_ctc_weight=args.joint_ctc_weight,
        prefer_quoted=args.prefer_quoted,
        max_prompt_chars=args.max_prompt_chars,
        max_prompt_tokens=args.max_prompt_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        allowed_origins=tuple(args.allow_origin),
        max_chat_clips=args.max_chat_clips,
        max_chat_messages=args.max_chat_messages,
        max_chat_chars=args.max_chat_chars,
        max_chat_tokens=args.max_chat_tokens,
        max_completion_tokens=args.max_completion_tokens,
    )


def run_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ..cli_options import joint_ctc_weight_for, load_for_inference, resolve_device

    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    processor, model = load_for_inference(args, device)
    if (joint_ctc_weight := joint_ctc_weight_for(args, model)) is None:
        return 2
    settings = replace(settings, joint_ctc_weight=joint_ctc_weight)
    try:
        app = create_app(model, processor, settings)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
    "OneLineLogs",
    "RequestGuard",
    "ServerSettings",
    "create_app",
    "run_serve",
    "add_serve_arguments",
    "uvicorn_config",
]

"""`POST /v1/chat/completions`: OpenAI- and vLLM-compatible chat with audio content parts.

User messages mix text with `input_audio` parts (base64 wav/mp3/ogg/flac/webm/...) or vLLM's `audio_url` data URLs;
system (or `developer`) and assistant messages carry text, over as many turns as the limits allow. Conversations go
through the same `DynamicBatcher` as transcriptions (requests with equal generation options share a batch), behind
the same `RequestGuard` limits. Every parameter is either honoured or refused with a 400 that names it: a client is
never silently given something other than what it asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from ..chat import AudioPart, ChatError, parse_conversation
from ..inference.decoding import audio_positions, check_positions, new_token_budget
from ..inference.structured import quoting, schema_of
from ..joint_ctc import transcript_opening
from .guard import APIError, decode_upload, first_or_disconnect
from .settings import ServerSettings
from .streaming import EventPump, sse, start_event_stream, stream_error

logger = logging.getLogger(__name__)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# `user` and `metadata` are accepted as what they are at OpenAI (labels that do not change the answer), and so is a
# message's `name` (chat templates have no place for it); `model` may be any id, as for transcriptions.
HONOURED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed", "stop",
            "stream", "stream_options", "user", "metadata", "response_format", "structured_outputs"}  # fmt: skip
# Parameters accepted only at their neutral value (what OpenAI does when they are absent).
NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (False, True),
    "modalities": (["text"],), "service_tier": ("auto", "default"),
    "store": (False,),
}  # fmt: skip
MAX_STOPS, MAX_STOP_CHARS = 4, 200


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict, key: str, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise _bad(f"{key} must be {kind} between {low:g} and {high:g}, got {value!r}", key)
    return value


def generation_options(body: dict, settings: ServerSettings) -> dict:
    """OpenAI sampling parameters -> `generate` options; unsupported ones are a 400 naming them.

    Without `temperature` decoding is greedy (the model's trained behaviour), unlike OpenAI's default of 1, or a beam
    search with the server's `num_beams`, as its transcriptions are.
    """
    for key, value in body.items():
        if key in HONOURED or value is None:
            continue
        if key not in NEUTRAL:
            raise _bad(f"parameter '{key[:60]}' is not supported by this server", key[:60], "unsupported_parameter")
        if value not in NEUTRAL[key]:
            raise _bad(f"{key}={value!r:.80} is not supported by this server (only {NEUTRAL[key][0]!r})", key,
                       "unsupported_parameter")  # fmt: skip
    if _number(body, "n", 1, 1e9, integer=True) not in (None, 1):
        raise _bad("n must be 1: this server returns one choice per request (send several requests)", "n",
                   "unsupported_parameter")  # fmt: skip
    new_tokens = _number(body, "max_completion_tokens", 1, settings.max_completion_tokens, integer=True)
    if new_tokens is None:
        new_tokens = _number(body, "max_tokens", 1, settings.max_completion_tokens, integer=True)
    # None: the model's generation_config.json decides (then `default_generation_kwargs`' fallback).
    options: dict[str, Any] = {"max_new_tokens": new_tokens or settings.max_new_tokens}
    temperature, top_p = _number(body, "temperature", 0, 2), _number(body, "top_p", 0, 1)
    if top_p == 0:
        raise _bad("top_p must be greater than 0", "top_p")
    if temperature:
        options.update(do_sample=True, temperature=float(temperature))
        if top_p is not None and top_p < 1:
            options["top_p"] = float(top_p)
    elif settings.num_beams:
        options["num_beams"] = settings.num_beams
    seed = _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    if seed is not None:
        options["seed"] = seed
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None:
        if (
            not isinstance(stops, list)
            or not 0 < len(stops) <= MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
        ):
            raise _bad(f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings of at most "
                       f"{MAX_STOP_CHARS} characters", "stop")  # fmt: skip
        options["stop"] = tuple(stops)
    schema = response_schema(body.get("response_format"))
    if schema is not None:
        options["json_schema"] = json.dumps(schema)  # text: batch options must be hashable
    held = structured_outputs(body.get("structured_outputs"))
    if held and schema is not None:
        raise _bad("give response_format (json_schema / json_object) or structured_outputs, not both",
                   "structured_outputs")  # fmt: skip
    return options | held


def response_schema(response_format: Any) -> dict | None:
    """OpenAI's `response_format` -> the JSON schema the answer must follow (None: free text). `json_object` is
    any JSON object; `json_schema` is enforced while decoding (`speechlm.inference.structured`), `strict` or not."""
    from ..inference.structured import JSON_OBJECT_SCHEMA, schema_grammar

    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise _bad("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": "
                   "\"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}", "response_format")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise _bad("response_format.json_schema.schema must be a JSON schema object",
                   "response_format.json_schema.schema")  # fmt: skip
    try:
        schema_grammar(spec["schema"])
    except ValueError as error:
        raise _bad(f"response_format: {error}", "response_format.json_schema.schema") from None
    return spec["schema"]


REGEX_SPECIAL = set("\\.+*?()|[]{}^$")


def structured_outputs(value: Any) -> dict:
    """vLLM's `structured_outputs` extra (`{"regex": ...}`, `{"choice": [...]}` or `{"json": schema}`; OpenAI's
    `response_format` has no regex) -> a `regex` or `json_schema` option, checked (a 400 naming what is wrong)."""
    from ..inference.structured import regex_grammar, schema_grammar

    if value is None:
        return {}
    kinds = ("regex", "choice", "json")
    given = [key for key in kinds if isinstance(value, dict) and value.get(key) is not None]
    if not isinstance(value, dict) or len(given) != 1 or set(value) - set(kinds):
        raise _bad("structured_outputs must hold exactly one of regex (a string), choice (a list of strings) or "
                   "json (a JSON schema object)", "structured_outputs")  # fmt: skip
    kind, param = given[0], f"structured_outputs.{given[0]}"
    spec = value[kind]
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
            raise _bad("structured_outputs.choice must be a non-empty list of non-empty strings", param)
        spec = "|".join("".join(f"\\{c}" if c in REGEX_SPECIAL else c for c in choice) for choice in spec)
    try:
        if kind == "json":
            if not isinstance(spec, dict):
                raise ValueError("must be a JSON schema object")
            schema_grammar(spec)
            return {"json_schema": json.dumps(spec)}
        regex_grammar(spec)
    except ValueError as error:
        raise _bad(f"{param}: {error}", param) from None
    return {"regex": spec}


def openai_messages(messages: Any, settings: ServerSettings) -> list[dict]:
    """OpenAI's message list -> `speechlm.chat`'s (roles mapped, fields checked); content is checked there."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    if len(messages) > settings.max_chat_messages:
        raise _bad(f"{len(messages)} messages, more than the limit of {settings.max_chat_messages}", "messages",
                   "context_length_exceeded")  # fmt: skip
    converted, chars = [], 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{where}: role {str(role)[:40]!r} is not supported (system, developer, user, assistant)",
                       f"{where}.role")  # fmt: skip
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise _bad(f"{where}: field '{extra[0][:40]}' is not supported", f"{where}.{extra[0][:40]}",
                       "unsupported_parameter")  # fmt: skip
        content = message.get("content")
        if content is None:
            raise _bad(f"{where}: content is missing", f"{where}.content")
        parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
        for part_index, part in enumerate(parts):
            if isinstance(part, dict) and part.get("type") == "image_url":
                raise _bad(f"{where}.content[{part_index}]: images are not supported; this model hears audio "
                           "(input_audio parts)", f"{where}.content[{part_index}]")  # fmt: skip
            text = part if isinstance(part, str) else part.get("text") if isinstance(part, dict) else None
            chars += len(text) if isinstance(text, str) else 0
        converted.append({"role": ROLES[role], "content": content})
    if chars > settings.max_chat_chars:
        raise _bad(f"the messages hold {chars} characters of text, more than the limit of {settings.max_chat_chars}",
                   "messages", "context_length_exceeded")  # fmt: skip
    return converted


def _chat_error(error: ChatError) -> APIError:
    where = error.location.replace("conversation[0].", "").replace("conversation[0]", "") or "messages"
    return _bad(f"{where}: {error.problem}", where, "invalid_audio" if "audio" in error.problem else None)


async def load_conversation(messages: list[dict], sampling_rate: int, settings: ServerSettings) -> tuple[list, int]:
    """Validated messages with every clip decoded under the server's audio limits, and the number of clips."""
    try:
        parsed = parse_conversation(messages, 0, settings.max_chat_clips)
    except ChatError as error:
        if "max_clips" in error.problem:
            raise _bad(f"{error.problem.split(',')[0]}, more than the limit of {settings.max_chat_clips} per "
                       "request", "messages", "too_many_audio_clips") from None  # fmt: skip
        raise _chat_error(error) from None
    conversation, clips = [], 0
    for m, message in enumerate(parsed):
        content = []
        for part in message.parts:
            if not isinstance(part, AudioPart):
                content.append({"type": "text", "text": part})
                continue
            if not isinstance(part.source, bytes):
                raise _bad(f"messages[{m}]: send audio as base64 (input_audio or a data: URL)", f"messages[{m}]")
            _, m_at, p_at = part.where
            name = f"messages[{m_at}].content[{p_at}].{(part.name or 'audio.wav').rsplit('.', 1)[-1]}"
            audio = await decode_upload(part.source, name, sampling_rate, settings, f"messages[{m_at}].content[{p_at}]",
                                        max_seconds=settings.max_chunk_seconds)  # fmt: skip
            content.append({"type": "audio", "audio": audio})
            clips += 1
        conversation.append({"role": message.role, "content": content})
    return conversation, clips


def add_chat_routes(app: FastAPI, model, processor, settings: ServerSettings, batcher) -> None:
    """Register `POST /v1/chat/completions` on `app` (the server's model, processor and batcher)."""
    sampling_rate = processor.sampling_rate
    audio_token = processor.tokenizer.convert_tokens_to_ids("<|audio|>")

    def prompt_tokens(conversation: list, new_tokens: int) -> tuple[int, int]:
        """(text tokens, audio positions) of the rendered conversation, checked against the limits and the LLM."""
        try:
            inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, max_clips=settings.max_chat_clips)  # fmt: skip
        except ChatError as error:
            raise _chat_error(error) from None
        except ValueError as error:  # the processor refused a clip or the text: a request problem, said as such
            raise _bad(f"messages: {error}", "messages") from None
        ids = inputs["input_ids"][0][inputs["decoder_attention_mask"][0].bool()]
        text = int(ids.numel() - (ids == audio_token).sum())
        if text > settings.max_chat_tokens:
            raise _bad(f"the conversation has {text} text tokens, more than the limit of {settings.max_chat_tokens}",
                       "messages", "context_length_exceeded")  # fmt: skip
        clips = [part["audio"] for message in conversation for part in message["content"] if part["type"] == "audio"]
        audio = sum(audio_positions(model, processor, len(clip)) for clip in clips)
        try:
            check_positions(model, audio, text, new_tokens, "this conversation")
        except ValueError as error:
            raise _bad(str(error), "messages", "context_length_exceeded") from None
        return text, audio

    def joint_transcript_option(clips: int, options: dict) -> dict:
        """The server's joint CTC weight for an answer held to a schema that opens with a `transcript` string
        (`speechlm.joint_ctc.transcript_opening`), about one clip: the CTC head reads that clip's words into the
        field, the LLM alone writes the rest (the batcher finds the field's span). Empty for any other chat: the head
        has nothing to say about free answers, and with several clips it could not tell which one the field
        transcribes."""
        if not settings.joint_ctc_weight or clips != 1 or "json_schema" not in options:
            return {}
        if transcript_opening(json.loads(options["json_schema"])) is None:
            return {}
        return {"joint_ctc_weight": settings.joint_ctc_weight}

    def quoted_choice_option(options: dict) -> dict:
        """`prefer_quoted` for an answer held to a schema that quotes its values from a transcript, decoded with
        beams (the server's `prefer_quoted`; the batcher keeps the best beam whose values all are quoted)."""
        if not settings.prefer_quoted or options.get("do_sample"):
            return {}
        return {"prefer_quoted": True} if quoting(schema_of(options)) else {}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            raise _bad("the request body must be JSON (Content-Type: application/json)") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        if not isinstance(body.get("model", ""), str):
            raise _bad("model must be a string", "model")
        options = generation_options(body, settings)
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise _bad("stream must be true or false", "stream")
        stream_options = body.get("stream_options") or {}
        if stream_options and (not stream or not isinstance(stream_options, dict)
                               or set(stream_options) - {"include_usage"}):  # fmt: skip
            raise _bad("stream_options takes only include_usage, and only with stream=true", "stream_options")
        messages = openai_messages(body.get("messages"), settings)
        conversation, clips = await load_conversation(messages, sampling_rate, settings)
        options |= joint_transcript_option(clips, options) | quoted_choice_option(options)
        budget = new_token_budget(options, model)
        text, audio = await run_in_threadpool(prompt_tokens, conversation, budget)
        usage = {"prompt_tokens": text + audio, "prompt_tokens_details": {"audio_tokens": audio, "cached_tokens": 0}}
        reply = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": settings.model_name}
        if stream:
            include_usage = bool(stream_options.get("include_usage"))
            return await stream_chat(request, conversation, options, reply, usage, include_usage)
        work = asyncio.ensure_future(asyncio.wait_for(batcher.chat(conversation, **options), settings.request_timeout))
        try:
            result = await first_or_disconnect(request, work, "chat completion")
        except (TimeoutError, ValueError) as error:
            raise failure(error) from None
        usage.update(completion_tokens=result.completion_tokens, total_tokens=text + audio + result.completion_tokens)
        message = {"role": "assistant", "content": result.text, "refusal": None}
        choice = {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}
        return reply | {"object": "chat.completion", "choices": [choice], "usage": usage}

    def failure(error: Exception) -> Exception:
        """A decoding failure as the client should see it: a timeout is a 504, a refused input a 400."""
        if isinstance(error, TimeoutError):
            return APIError(504, f"The chat completion took longer than the {settings.request_timeout:g} s request "
                            "timeout.", type="timeout", code="request_timeout")  # fmt: skip
        if isinstance(error, ValueError):  # the model refused the conversation (checked up front, so rare)
            return _bad(f"messages: {error}", "messages")
        return error

    async def stream_chat(request: Request, conversation: list, options: dict, reply: dict, usage: dict,
                          include_usage: bool):  # fmt: skip
        """`chat.completion.chunk` events: the role and first text together, text deltas, the finish reason,
        usage when asked for, then `[DONE]`."""
        pump = EventPump(settings.request_timeout)
        work = asyncio.ensure_future(batcher.chat(conversation, sink=pump.sink, **options))
        base = reply | {"object": "chat.completion.chunk"} | ({"usage": None} if include_usage else {})

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return sse(base | {"choices": [{"index": 0, "delta": delta, "logprobs": None,
                                            "finish_reason": finish_reason}]})  # fmt: skip

        async def events():
            started = False
            try:
                async for delta in pump.run(work):
                    yield ("" if started else chunk({"role": "assistant", "content": ""})) + chunk({"content": delta})
                    started = True
                result = work.result()
                end = "" if started else chunk({"role": "assistant", "content": ""})
                end += chunk({}, result.finish_reason)
                if include_usage:
                    total = usage["prompt_tokens"] + result.completion_tokens
                    final = usage | {"completion_tokens": result.completion_tokens, "total_tokens": total}
                    end += sse(base | {"choices": [], "usage": final})
                yield end + sse("[DONE]")
            except Exception as error:  # noqa: BLE001 - before the first event the client gets a normal error
                error = failure(error)
                if not started:
                    raise error from None
                yield sse(stream_error(error, logger)) + sse("[DONE]")

        return await start_event_stream(request, events(), "chat completion")


__all__ = ["add_chat_routes", "generation_options", "openai_messages"]
